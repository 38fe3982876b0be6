//! Prometheus metrics: one registry per hub, so two hubs in one test never share counters.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub type TransportLabel = Vec<(&'static str, &'static str)>;

pub struct Metrics {
    registry: Registry,
    pub connections: Family<TransportLabel, Gauge>,
    pub subscriptions: Gauge,
    pub messages_published: Counter,
    pub messages_delivered: Family<TransportLabel, Counter>,
    pub delivery_latency: Histogram,
    pub slow_consumers: Counter,
    pub store_commit: Histogram,
    pub job_runs: Family<LabelSet, Counter>,
    pub job_skipped_ticks: Family<LabelSet, Counter>,
    pub feed_polls: Family<LabelSet, Counter>,
    /// Webhook delivery attempts by `result`: success, failure (will be retried), exhausted
    /// (retries used up, recorded as failed), gone (410: the webhook was disabled).
    pub webhook_deliveries: Family<TransportLabel, Counter>,
    pub webhook_latency: Histogram,
    /// 1 while the store answers, 0 while it is unreachable (the Redis engine sets it).
    pub store_up: Gauge,
}

/// Labels whose values are only known at run time (job and feed names).
pub type LabelSet = Vec<(&'static str, String)>;

/// The `transport` label value for each surface.
pub fn transport(name: &'static str) -> TransportLabel {
    vec![("transport", name)]
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tidings");
        let connections = Family::<TransportLabel, Gauge>::default();
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        let store_up = Gauge::default();
        store_up.set(1);
        registry.register(
            "store_up",
            "1 while the message store answers, 0 while it is unreachable",
            store_up.clone(),
        );
        let subscriptions = Gauge::default();
        registry.register(
            "subscriptions",
            "Active channel subscriptions",
            subscriptions.clone(),
        );
        let messages_published = Counter::default();
        registry.register(
            "messages_published",
            "Messages committed to the store (duplicates excluded)",
            messages_published.clone(),
        );
        let messages_delivered = Family::<TransportLabel, Counter>::default();
        registry.register(
            "messages_delivered",
            "Messages written to subscribers",
            messages_delivered.clone(),
        );
        let delivery_latency = Histogram::new(latency_buckets());
        registry.register(
            "delivery_latency_seconds",
            "Time from a message's acceptance to its write to a subscriber",
            delivery_latency.clone(),
        );
        let slow_consumers = Counter::default();
        registry.register(
            "slow_consumers",
            "Subscribers that fell behind their outbound queue",
            slow_consumers.clone(),
        );
        let store_commit = Histogram::new(latency_buckets());
        registry.register(
            "store_commit_seconds",
            "Duration of one group commit",
            store_commit.clone(),
        );
        let job_runs = Family::<LabelSet, Counter>::default();
        registry.register(
            "job_runs",
            "Finished job runs by job and status",
            job_runs.clone(),
        );
        let job_skipped_ticks = Family::<LabelSet, Counter>::default();
        registry.register(
            "job_skipped_ticks",
            "Scheduled ticks skipped because the job was still running",
            job_skipped_ticks.clone(),
        );
        let feed_polls = Family::<LabelSet, Counter>::default();
        registry.register(
            "feed_polls",
            "Feed polls by feed and result",
            feed_polls.clone(),
        );
        let webhook_deliveries = Family::<TransportLabel, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts by result",
            webhook_deliveries.clone(),
        );
        let webhook_latency = Histogram::new(latency_buckets());
        registry.register(
            "webhook_delivery_seconds",
            "Time from a webhook request's start to its answer (or failure)",
            webhook_latency.clone(),
        );
        Self {
            registry,
            connections,
            subscriptions,
            messages_published,
            messages_delivered,
            delivery_latency,
            slow_consumers,
            store_commit,
            job_runs,
            job_skipped_ticks,
            feed_polls,
            webhook_deliveries,
            webhook_latency,
            store_up,
        }
    }
}

impl Metrics {
    /// Later subsystems (jobs, feeds, webhooks) register their metrics here at start-up.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Records `count` deliveries of a message accepted at `time_ms` on `transport`.
    pub fn delivered(&self, transport_label: &TransportLabel, time_ms: i64, count: u64) {
        self.messages_delivered
            .get_or_create(transport_label)
            .inc_by(count);
        let age = (crate::clock::now_ms() - time_ms).max(0) as f64 / 1000.0;
        self.delivery_latency.observe(age);
    }
}
