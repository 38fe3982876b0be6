//! Where webhooks may point: `http`/`https` URLs whose host passes the allow/deny lists, with
//! private and loopback addresses refused unless allowed, so that an exposed API cannot be
//! used to reach the hub's own network (server-side request forgery). Names are checked when a
//! webhook is registered and again, through the client's resolver, at every connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use url::Url;

/// One allow or deny entry: a host name, `*.suffix`, an IP address or a CIDR block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRule {
    Name(String),
    Suffix(String),
    Net(IpAddr, u8),
}

impl HostRule {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim().to_ascii_lowercase();
        if raw.is_empty() {
            return Err("an empty host rule".into());
        }
        if let Some((ip, bits)) = raw.split_once('/') {
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("{raw:?} is not a CIDR block"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits: u8 = bits
                .parse()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{raw:?} has a bad prefix length"))?;
            return Ok(HostRule::Net(ip, bits));
        }
        let bare = raw.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            return Ok(HostRule::Net(ip, bits));
        }
        if let Some(suffix) = raw.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                return Err(format!("{raw:?} is not a host pattern"));
            }
            return Ok(HostRule::Suffix(suffix.to_owned()));
        }
        if raw.contains('*') || raw.contains('/') || raw.contains(' ') {
            return Err(format!("{raw:?} is not a host name"));
        }
        Ok(HostRule::Name(raw))
    }

    fn matches_name(&self, host: &str) -> bool {
        match self {
            HostRule::Name(n) => n == host,
            HostRule::Suffix(s) => host
                .strip_suffix(s.as_str())
                .is_some_and(|rest| rest.ends_with('.')),
            HostRule::Net(..) => false,
        }
    }

    fn matches_ip(&self, ip: IpAddr) -> bool {
        match self {
            HostRule::Net(net, bits) => in_network(ip, *net, *bits),
            _ => false,
        }
    }
}

fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (canonical(ip), canonical(net)) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Loopback, private, link-local, shared, unspecified, multicast and other non-public ranges.
pub fn is_private(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && (c == 0 || c == 2))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8
                // NAT64 and 6to4 carry an IPv4 address that may be a private one.
                || is_nat64_or_6to4_private(v6)
        }
    }
}

/// `64:ff9b::/96` (NAT64) and `2002::/16` (6to4) embed an IPv4 address; judge that one.
fn is_nat64_or_6to4_private(v6: std::net::Ipv6Addr) -> bool {
    let seg = v6.segments();
    let embedded = if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
        Some((seg[6], seg[7]))
    } else if seg[0] == 0x2002 {
        Some((seg[1], seg[2]))
    } else {
        None
    };
    embedded.is_some_and(|(hi, lo)| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        is_private(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)))
    })
}

/// The destination rules of `[webhook_policy]`.
#[derive(Debug, Clone, Default)]
pub struct HostPolicy {
    pub allow_private: bool,
    pub allow: Vec<HostRule>,
    pub deny: Vec<HostRule>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TargetError {
    #[error("{0:?} is not a URL")]
    NotUrl(String),
    #[error("webhook URLs must be http or https, not {0:?}")]
    Scheme(String),
    #[error("the webhook URL has no host")]
    NoHost,
    #[error("the webhook URL may not carry a #fragment")]
    Fragment,
    #[error("destination {0} is not allowed by [webhook_policy] deny_hosts")]
    Denied(String),
    #[error("destination {0} is a private or loopback address; allow it with [webhook_policy] allow_private or allow_hosts")]
    Private(String),
}

/// Whether a host name was decided by a rule or must be judged by its addresses.
#[derive(PartialEq, Eq)]
enum NameVerdict {
    Allowed,
    Denied,
    ByAddress,
}

impl HostPolicy {
    fn judge_name(&self, host: &str) -> NameVerdict {
        let host = host.to_ascii_lowercase();
        if self.deny.iter().any(|r| r.matches_name(&host)) {
            NameVerdict::Denied
        } else if self.allow.iter().any(|r| r.matches_name(&host)) {
            NameVerdict::Allowed
        } else {
            NameVerdict::ByAddress
        }
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), TargetError> {
        if self.deny.iter().any(|r| r.matches_ip(ip)) {
            return Err(TargetError::Denied(ip.to_string()));
        }
        if self.allow.iter().any(|r| r.matches_ip(ip)) || self.allow_private || !is_private(ip) {
            return Ok(());
        }
        Err(TargetError::Private(ip.to_string()))
    }

    /// Parses and checks a webhook URL; resolves a host name to check its addresses (a name
    /// that does not resolve now is accepted: the resolver checks again at delivery).
    pub async fn check_url(&self, raw: &str) -> Result<Url, TargetError> {
        let url = self.check_without_lookup(raw)?;
        if let Some(url::Host::Domain(name)) = url.host() {
            if self.judge_name(name) == NameVerdict::ByAddress {
                let port = url.port_or_known_default().unwrap_or(80);
                let lookup = tokio::net::lookup_host((name, port));
                if let Ok(Ok(addrs)) =
                    tokio::time::timeout(std::time::Duration::from_secs(5), lookup).await
                {
                    for addr in addrs {
                        self.check_ip(addr.ip())?;
                    }
                }
            }
        }
        Ok(url)
    }

    /// Everything `check_url` checks but what needs a name lookup: the scheme, the host, IP
    /// literals and host rules (also used on `[[webhooks]]` at start-up).
    pub fn check_without_lookup(&self, raw: &str) -> Result<Url, TargetError> {
        let url =
            Url::parse(raw).map_err(|_| TargetError::NotUrl(raw.chars().take(200).collect()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(TargetError::Scheme(url.scheme().to_owned()));
        }
        if url.fragment().is_some() {
            return Err(TargetError::Fragment);
        }
        match url.host() {
            None => return Err(TargetError::NoHost),
            Some(url::Host::Ipv4(ip)) => self.check_ip_host(IpAddr::V4(ip))?,
            Some(url::Host::Ipv6(ip)) => self.check_ip_host(IpAddr::V6(ip))?,
            Some(url::Host::Domain(name)) => {
                if name.is_empty() {
                    return Err(TargetError::NoHost);
                }
                if self.judge_name(name) == NameVerdict::Denied {
                    return Err(TargetError::Denied(name.to_owned()));
                }
            }
        }
        Ok(url)
    }

    /// An IP literal in a URL: names in `deny_hosts`/`allow_hosts` may also list it.
    fn check_ip_host(&self, ip: IpAddr) -> Result<(), TargetError> {
        match self.judge_name(&ip.to_string()) {
            NameVerdict::Denied => Err(TargetError::Denied(ip.to_string())),
            NameVerdict::Allowed => Ok(()),
            NameVerdict::ByAddress => self.check_ip(ip),
        }
    }

    /// Checks the URL's literal IP host (the resolver is not asked for those).
    pub fn check_literal(&self, url: &Url) -> Result<(), TargetError> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip_host(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip_host(IpAddr::V6(ip)),
            _ => Ok(()),
        }
    }
}

/// The HTTP client's resolver: system resolution, then only the addresses the policy allows.
pub struct GuardedResolver(pub Arc<HostPolicy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let verdict = policy.judge_name(&host);
            if matches!(verdict, NameVerdict::Denied) {
                return Err(Box::new(TargetError::Denied(host)) as _);
            }
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = match verdict {
                NameVerdict::Allowed => addrs.clone(),
                _ => addrs
                    .iter()
                    .copied()
                    .filter(|a| policy.check_ip(a.ip()).is_ok())
                    .collect(),
            };
            if allowed.is_empty() {
                let shown = addrs.first().map_or(host, |a| a.ip().to_string());
                return Err(Box::new(TargetError::Private(shown)) as _);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow_private: bool, allow: &[&str], deny: &[&str]) -> HostPolicy {
        HostPolicy {
            allow_private,
            allow: allow.iter().map(|r| HostRule::parse(r).unwrap()).collect(),
            deny: deny.iter().map(|r| HostRule::parse(r).unwrap()).collect(),
        }
    }

    #[tokio::test]
    async fn urls_are_checked_for_scheme_host_and_private_addresses() {
        let strict = policy(
            false,
            &["10.1.0.0/16", "*.internal.example"],
            &["evil.example"],
        );
        for bad in [
            "ftp://example.org/x",
            "javascript:alert(1)",
            "http://",
            "not a url",
            "http://127.0.0.1:9/hook",
            "http://[::1]/hook",
            "http://[::ffff:192.168.1.1]/",
            "http://10.2.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://0.0.0.0/",
            "http://evil.example/",
            "http://example.org/#frag",
        ] {
            assert!(strict.check_url(bad).await.is_err(), "{bad}");
        }
        for good in [
            "https://93.184.215.14/hook",
            "http://10.1.2.3:8080/in-allowed-net",
            "https://svc.internal.example/hook",
        ] {
            assert!(strict.check_url(good).await.is_ok(), "{good}");
        }
        let open = policy(true, &[], &["127.0.0.2"]);
        assert!(open.check_url("http://127.0.0.1:1/h").await.is_ok());
        assert!(open.check_url("http://127.0.0.2:1/h").await.is_err());
    }

    #[test]
    fn rules_parse_and_private_ranges_are_known() {
        assert!(HostRule::parse("10.0.0.0/33").is_err());
        assert!(HostRule::parse("a*b").is_err());
        assert_eq!(
            HostRule::parse("Example.ORG").unwrap(),
            HostRule::Name("example.org".into())
        );
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.0.1",
            "100.64.0.1",
            "fd00::1",
            "fe80::1",
            "::",
            "192.0.0.8",
            "192.0.2.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "2606:4700::1111",
            "192.0.32.10",
            "64:ff9b::808:808",
        ] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
        let suffix = HostRule::parse("*.example.org").unwrap();
        assert!(suffix.matches_name("a.example.org"));
        assert!(!suffix.matches_name("badexample.org"));
        assert!(!suffix.matches_name("example.org"));
    }
}
