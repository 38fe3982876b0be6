//! Per-IP publish rate limit: a fixed one-second window, off when the limit is 0.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

pub struct RateLimiter {
    per_second: u32,
    windows: Mutex<HashMap<IpAddr, (i64, u32)>>,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts `n` publishes from `ip`; false when that goes over the limit (nothing is counted).
    pub fn allow(&self, ip: IpAddr, n: u32) -> bool {
        self.allow_at(ip, n, crate::clock::now_ms() / 1000)
    }

    fn allow_at(&self, ip: IpAddr, n: u32, second: i64) -> bool {
        if self.per_second == 0 {
            return true;
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() > 100_000 {
            windows.retain(|_, (s, _)| *s == second);
        }
        let entry = windows.entry(ip).or_insert((second, 0));
        if entry.0 != second {
            *entry = (second, 0);
        }
        if entry.1.saturating_add(n) > self.per_second {
            return false;
        }
        entry.1 += n;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_ip() {
        let r = RateLimiter::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(r.allow_at(a, 1, 10));
        assert!(r.allow_at(a, 1, 10));
        assert!(!r.allow_at(a, 1, 10));
        assert!(
            !r.allow_at(b, 3, 10),
            "a batch over the limit is refused whole"
        );
        assert!(r.allow_at(b, 2, 10));
        assert!(r.allow_at(a, 2, 11), "a new second starts a new window");
        assert!(RateLimiter::new(0).allow(a, 1_000_000));
    }
}
