//! The shared store: buckets in Redis or Redis Cluster, so that service replicas (and the
//! Envoys behind them) share one accounting.
//!
//! One call of the Lua script `gcra.lua` per hash slot does check-and-charge (and the lease)
//! atomically; its header says why it is atomic. Bucket keys come from
//! `laneguard_core::key::encode`, which puts the tenant in a hash tag, so all of a tenant's
//! buckets share one slot and a tenant-only request is one script call. A bucket without a
//! tenant (a model's `model_total`) may live in another slot: then each slot group is charged
//! in turn, and if a later group refuses, the groups already charged are refunded (their TAT
//! moved back by what was charged). `docs/storage.md` describes the small race that leaves.
//!
//! The script returns the buckets' states from before the call, and the store recomputes the
//! outcome with [`decide`] from them: the statuses come from the same pure function as the
//! memory store's, and a disagreement between Lua and Rust is logged as a bug.
//!
//! Failure: every Redis call is bounded by [`RedisSettings::timeout`]. A refused or reset
//! connection, a timeout, `CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`, `LOADING` or `READONLY`
//! is transient ([`StoreError::Unavailable`] or [`StoreError::Timeout`], answered with gRPC
//! `UNAVAILABLE`). The connection is made lazily and dropped after a connection-level error;
//! the next request reconnects (at most one attempt per [`RedisSettings::reconnect_backoff`]),
//! so the service recovers by itself when Redis comes back.

use std::time::{Duration, Instant};

use laneguard_core::gcra::Gcra;
use prometheus_client::metrics::counter::Counter;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Script, Value,
};
use tokio::sync::Mutex;

use super::{
    decide, decide_refund, decide_report, decide_slotted, first_mentions, Charge, Outcome, Store,
    StoreError, StoreFuture, UsageKey, UsageRow,
};

/// The scheme of a standalone Redis URL.
pub const REDIS_SCHEME: &str = "redis://";
/// The scheme of a Redis Cluster seed list: `redis-cluster://host:port,host:port,...`.
pub const CLUSTER_SCHEME: &str = "redis-cluster://";

/// Redis Cluster's number of hash slots.
const SLOTS: u16 = 16384;

/// Tunables of a [`RedisStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisSettings {
    /// Bound on every Redis call (connecting included). Past it the request fails with a
    /// transient error instead of waiting.
    pub timeout: Duration,
    /// How long a bucket's key outlives the moment its bucket is full again. A full bucket is
    /// the same as an absent key, so this only needs to cover clock skew between replicas.
    pub idle_margin: Duration,
    /// After a failed connection attempt, requests fail at once (transient) for this long
    /// instead of each trying to connect to a Redis that is down.
    pub reconnect_backoff: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            timeout: Duration::from_millis(250),
            idle_margin: Duration::from_secs(60),
            reconnect_backoff: Duration::from_millis(100),
        }
    }
}

/// The cluster seed nodes of a `redis-cluster://h1:p1,h2:p2` spec, as `redis://` URLs, or
/// `None` when the spec is not of that form (no scheme, or an empty node).
pub fn cluster_nodes(spec: &str) -> Option<Vec<String>> {
    let list = spec.strip_prefix(CLUSTER_SCHEME)?;
    let nodes: Vec<String> = list
        .split(',')
        .map(|n| (!n.is_empty() && !n.contains('/')).then(|| format!("{REDIS_SCHEME}{n}")))
        .collect::<Option<_>>()?;
    (!nodes.is_empty()).then_some(nodes)
}

/// The first slot of every range in a `CLUSTER SLOTS` reply (`[[start, end, primary, ...]]`).
fn slot_range_starts(reply: &Value) -> Vec<u16> {
    let Value::Array(ranges) = reply else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|r| match r {
            Value::Array(fields) => match fields.first() {
                Some(Value::Int(start)) => u16::try_from(*start).ok(),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The Redis Cluster hash slot of a key: CRC16 (XMODEM) of the hash tag (the text between
/// the first `{` and the next `}`, when not empty), else of the whole key, modulo 16384.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let len = rest.iter().position(|&b| b == b'}')?;
            (len > 0).then(|| &rest[..len])
        })
        .unwrap_or(bytes);
    crc16(hashed) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

enum Target {
    Standalone(Client),
    Cluster(redis::cluster::ClusterClient),
}

/// A live connection of either kind. Both are cheap to clone (multiplexed handles). Every
/// command or pipeline sent through it counts one round trip
/// (`laneguard_service_redis_round_trips_total`).
#[derive(Clone)]
struct Conn {
    link: Link,
    round_trips: Counter,
}

#[derive(Clone)]
enum Link {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.round_trips.inc();
        match &mut self.link {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.round_trips.inc();
        match &mut self.link {
            Link::Single(c) => c.req_packed_commands(cmd, offset, count),
            Link::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.link {
            Link::Single(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

#[derive(Default)]
struct Slot {
    /// The current connection and its generation, so that an error on an old connection
    /// does not drop a newer one.
    conn: Option<(u64, Conn)>,
    generation: u64,
    failed: Option<(Instant, String)>,
}

/// The Redis (or Redis Cluster) [`Store`].
pub struct RedisStore {
    target: Target,
    settings: RedisSettings,
    script: Script,
    /// Adds a batch of usage-ledger counts to one hour's hash, atomically.
    usage_script: Script,
    slot: Mutex<Slot>,
    round_trips: Counter,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("kind", &self.name())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// One slot group of a request: the distinct keys (as indices of their first mention in
/// the request's charges) that live in one hash slot.
#[derive(Debug)]
struct Group {
    keys: Vec<usize>,
}

/// What one group's script call reported.
struct Charged {
    admitted: bool,
    grant: u32,
    /// With slots asked for: each group key's old slot tail and the hold the script gave
    /// (0: none), in the group's key order. Empty otherwise, and when refused.
    slots: Vec<(u64, u64)>,
}

/// The Redis key of a bucket's slot tail (`laneguard_core::engine::ask_slot`): in the same
/// hash slot as the bucket, so one script call touches both. A key with a hash tag (every
/// tenant's key) keeps it; a key without one (a model's `model_total`) is wrapped in one,
/// which hashes exactly its text, as Redis Cluster hashes the bare key.
pub fn slot_key(key: &str) -> String {
    if laneguard_core::key::hash_tag(key).is_some() {
        format!("{key}|slot")
    } else {
        format!("{{{key}}}|slot")
    }
}

impl RedisStore {
    /// A store on a standalone Redis, `redis://[user:password@]host:port[/db]`. Nothing is
    /// connected until the first request (or [`RedisStore::ping`]).
    pub fn standalone(url: &str, settings: RedisSettings) -> Result<RedisStore, StoreError> {
        let client = Client::open(url)
            .map_err(|e| StoreError::Backend(format!("invalid Redis URL `{url}`: {e}")))?;
        Ok(RedisStore::with_target(
            Target::Standalone(client),
            settings,
        ))
    }

    /// A store on a Redis Cluster, given seed node URLs (`redis://host:port`); the client
    /// discovers the other nodes and the slot map from them.
    pub fn cluster(nodes: &[String], settings: RedisSettings) -> Result<RedisStore, StoreError> {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let client = ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(settings.timeout)
            .response_timeout(settings.timeout)
            // Redirections (MOVED/ASK) and brief TRYAGAIN are retried inside the timeout;
            // a longer outage surfaces as a transient error instead of a wait.
            .retries(2)
            .min_retry_wait(millis(settings.timeout / 10).max(1))
            .max_retry_wait(millis(settings.timeout / 4).max(1))
            .build()
            .map_err(|e| {
                StoreError::Backend(format!("invalid Redis Cluster nodes {nodes:?}: {e}"))
            })?;
        Ok(RedisStore::with_target(Target::Cluster(client), settings))
    }

    /// `redis://...` or `redis-cluster://host:port,host:port,...`.
    pub fn from_spec(spec: &str, settings: RedisSettings) -> Result<RedisStore, StoreError> {
        if spec.starts_with(CLUSTER_SCHEME) {
            let nodes = cluster_nodes(spec).ok_or_else(|| {
                StoreError::Backend(format!(
                    "invalid Redis Cluster spec `{spec}`: expected {CLUSTER_SCHEME}host:port,host:port,..."
                ))
            })?;
            RedisStore::cluster(&nodes, settings)
        } else {
            RedisStore::standalone(spec, settings)
        }
    }

    fn with_target(target: Target, settings: RedisSettings) -> RedisStore {
        RedisStore {
            target,
            settings,
            script: Script::new(include_str!("gcra.lua")),
            usage_script: Script::new(USAGE_LUA),
            slot: Mutex::new(Slot::default()),
            round_trips: Counter::default(),
        }
    }

    /// Count round trips into `counter` (`Metrics::redis_round_trips`) from now on.
    pub fn with_round_trips(mut self, counter: Counter) -> RedisStore {
        self.round_trips = counter;
        self
    }

    pub fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    /// Connect if needed and PING (every primary, on a cluster connection's routing).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.query::<String>(&redis::cmd("PING")).await.map(|_| ())
    }

    /// A cluster answers when it says `cluster_state:ok` and the primary of every slot range
    /// answers a `PING` sent to it. (A plain `PING` goes to the primaries the client is
    /// connected to, and so still succeeds while one of them is gone.)
    async fn probe_cluster(&self) -> Result<(), StoreError> {
        let info: String = self.query(redis::cmd("CLUSTER").arg("INFO")).await?;
        if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
            return Err(StoreError::Unavailable(
                "the Redis Cluster does not report cluster_state:ok".into(),
            ));
        }
        let slots: Value = self.query(redis::cmd("CLUSTER").arg("SLOTS")).await?;
        let starts = slot_range_starts(&slots);
        if starts.is_empty() {
            return Err(StoreError::Unavailable(
                "the Redis Cluster serves no slot ranges".into(),
            ));
        }
        for start in starts {
            let (generation, conn) = self.connection().await?;
            let Link::Cluster(mut link) = conn.link else {
                return Ok(());
            };
            conn.round_trips.inc();
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                start,
                SlotAddr::Master,
            )));
            let cmd = redis::cmd("PING");
            let result =
                tokio::time::timeout(self.settings.timeout, link.route_command(&cmd, route)).await;
            self.finish(generation, result).await?;
        }
        Ok(())
    }

    fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    async fn connection(&self) -> Result<(u64, Conn), StoreError> {
        let mut slot = self.slot.lock().await;
        if let Some((generation, conn)) = &slot.conn {
            return Ok((*generation, conn.clone()));
        }
        if let Some((at, why)) = &slot.failed {
            if at.elapsed() < self.settings.reconnect_backoff {
                return Err(StoreError::Unavailable(format!(
                    "not connected to {} (last attempt failed: {why})",
                    self.name()
                )));
            }
        }
        let connected = tokio::time::timeout(self.settings.timeout, self.connect()).await;
        let conn = match connected {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                slot.failed = Some((Instant::now(), e.to_string()));
                return Err(classify(&e, self.settings.timeout));
            }
            Err(_) => {
                slot.failed = Some((Instant::now(), "connect timed out".into()));
                return Err(StoreError::Timeout(self.settings.timeout));
            }
        };
        slot.generation += 1;
        let generation = slot.generation;
        slot.conn = Some((generation, conn.clone()));
        slot.failed = None;
        log::info!("connected to {}", self.name());
        Ok((generation, conn))
    }

    async fn connect(&self) -> Result<Conn, RedisError> {
        let link = match &self.target {
            Target::Standalone(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(self.settings.timeout)
                    .set_response_timeout(self.settings.timeout);
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map(Link::Single)?
            }
            Target::Cluster(client) => client.get_async_connection().await.map(Link::Cluster)?,
        };
        Ok(Conn {
            link,
            round_trips: self.round_trips.clone(),
        })
    }

    /// Forget a connection that failed at the connection level, so the next call reconnects.
    async fn forget(&self, generation: u64, why: &str) {
        let mut slot = self.slot.lock().await;
        if matches!(&slot.conn, Some((g, _)) if *g == generation) {
            log::warn!("dropping the connection to {}: {why}", self.name());
            slot.conn = None;
        }
    }

    /// Map the result of one bounded call on connection `generation` to [`StoreError`],
    /// forgetting the connection after a connection-level failure.
    async fn finish<T>(
        &self,
        generation: u64,
        result: Result<Result<T, RedisError>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if is_connection_level(&e) {
                    self.forget(generation, &e.to_string()).await;
                }
                Err(classify(&e, self.settings.timeout))
            }
            Err(_) => {
                // A connection that does not answer in time may be half-open: start afresh.
                self.forget(generation, "timed out").await;
                Err(StoreError::Timeout(self.settings.timeout))
            }
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let (generation, mut conn) = self.connection().await?;
        let result =
            tokio::time::timeout(self.settings.timeout, cmd.query_async::<T>(&mut conn)).await;
        self.finish(generation, result).await
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let (generation, mut conn) = self.connection().await?;
        let result =
            tokio::time::timeout(self.settings.timeout, inv.invoke_async::<T>(&mut conn)).await;
        self.finish(generation, result).await
    }

    /// Split a request's distinct keys into hash-slot groups, in order of first mention.
    /// A standalone server takes any keys in one script, so it is always one group.
    fn groups(&self, charges: &[Charge], first: &[usize]) -> Vec<Group> {
        let mut groups: Vec<(u16, Group)> = Vec::new();
        for (i, charge) in charges.iter().enumerate() {
            if first[i] != i {
                continue;
            }
            let s = if self.is_cluster() {
                slot(&charge.key)
            } else {
                0
            };
            match groups.iter_mut().find(|(gs, _)| *gs == s) {
                Some((_, g)) => g.keys.push(i),
                None => groups.push((s, Group { keys: vec![i] })),
            }
        }
        groups.into_iter().map(|(_, g)| g).collect()
    }

    fn now_args(now_ns: u64) -> (u64, u64) {
        (now_ns / 1_000_000_000, now_ns % 1_000_000_000)
    }

    fn margin_ms(&self) -> u64 {
        u64::try_from(self.settings.idle_margin.as_millis()).unwrap_or(u64::MAX)
    }

    /// Run the script over one group in `mode` (`charge`, or `report`: charge
    /// unconditionally); fills `loaded` for the group's keys.
    /// With `slots`, the group's slot keys go too, and an admitted lease ask gives slots
    /// (gcra.lua, SLOTS).
    #[allow(clippy::too_many_arguments)]
    async fn charge_group(
        &self,
        mode: &str,
        group: &Group,
        charges: &[Charge],
        first: &[usize],
        lease: u32,
        slots: bool,
        now_ns: u64,
        loaded: &mut [Gcra],
    ) -> Result<Charged, StoreError> {
        let (now_s, now_n) = Self::now_args(now_ns);
        let mut inv = self.script.prepare_invoke();
        for &k in &group.keys {
            inv.key(&charges[k].key);
        }
        if slots {
            for &k in &group.keys {
                inv.key(slot_key(&charges[k].key));
            }
        }
        inv.arg(mode)
            .arg(now_s)
            .arg(now_n)
            .arg(self.margin_ms())
            .arg(lease);
        for (i, charge) in charges.iter().enumerate() {
            if let Some(pos) = group.keys.iter().position(|&k| k == first[i]) {
                inv.arg(pos + 1)
                    .arg(charge.rate.interval_ns())
                    .arg(charge.rate.burst.get())
                    .arg(charge.cost)
                    .arg(charge.age_ns);
            }
        }
        let reply: Vec<Value> = self.invoke(&inv).await?;
        let bad = |what: &str| StoreError::Backend(format!("unexpected script reply: {what}"));
        let n = group.keys.len();
        let with_slots = slots && reply.len() == 3 * n + 2;
        if reply.len() != n + 2 && !with_slots {
            return Err(bad("wrong length"));
        }
        let admitted = match reply[0] {
            Value::Int(1) => true,
            Value::Int(0) => false,
            _ => return Err(bad("admitted is not 0 or 1")),
        };
        let grant = match reply[1] {
            Value::Int(n) => u32::try_from(n).map_err(|_| bad("grant out of range"))?,
            _ => return Err(bad("grant is not an integer")),
        };
        for (&k, value) in group.keys.iter().zip(&reply[2..n + 2]) {
            loaded[k] = parse_tat(&charges[k].key, value)?;
        }
        let mut given = Vec::new();
        if with_slots {
            for (j, &k) in group.keys.iter().enumerate() {
                let tail = parse_tat(&slot_key(&charges[k].key), &reply[2 + n + j])?.tat_ns();
                let hold = match reply[2 + 2 * n + j] {
                    Value::Int(h) => u64::try_from(h).map_err(|_| bad("hold out of range"))?,
                    _ => return Err(bad("hold is not an integer")),
                };
                given.push((tail, hold));
            }
        }
        Ok(Charged {
            admitted,
            grant,
            slots: given,
        })
    }

    /// Read a group's states without charging (for the statuses of a refused request).
    async fn read_group(
        &self,
        group: &Group,
        charges: &[Charge],
        loaded: &mut [Gcra],
    ) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("MGET");
        for &k in &group.keys {
            cmd.arg(&charges[k].key);
        }
        let values: Vec<Value> = self.query(&cmd).await?;
        if values.len() != group.keys.len() {
            return Err(StoreError::Backend("MGET answered the wrong count".into()));
        }
        for (&k, value) in group.keys.iter().zip(&values) {
            loaded[k] = parse_tat(&charges[k].key, value)?;
        }
        Ok(())
    }

    /// Undo a group's charge: move each key's TAT back by what this request charged it
    /// (every mention's cost, plus `grant` units at the key's first-mention rate).
    async fn refund_group(
        &self,
        group: &Group,
        charges: &[Charge],
        first: &[usize],
        units: Refund,
        now_ns: u64,
    ) -> Result<(), StoreError> {
        let (now_s, now_n) = Self::now_args(now_ns);
        let mut inv = self.script.prepare_invoke();
        for &k in &group.keys {
            inv.key(&charges[k].key);
        }
        inv.arg("refund")
            .arg(now_s)
            .arg(now_n)
            .arg(self.margin_ms());
        let (whole_request, grant) = match units {
            Refund::Request { grant } => (true, grant),
            Refund::Grant(grant) => (false, grant),
        };
        for &k in &group.keys {
            let mut ns = u128::from(grant) * u128::from(charges[k].rate.interval_ns());
            if whole_request {
                for (i, c) in charges.iter().enumerate() {
                    if first[i] == k {
                        ns += u128::from(c.cost) * u128::from(c.rate.interval_ns());
                    }
                }
            }
            inv.arg(u64::try_from(ns).unwrap_or(u64::MAX));
        }
        self.invoke::<i64>(&inv).await.map(|_| ())
    }

    /// A report: every group charged unconditionally, in turn. Nothing to compensate (no
    /// group can refuse); if a later group fails, the error goes back to the caller, which
    /// re-sends the whole report, so the groups already charged count those hits twice: an
    /// over-count, which errs toward refusing, never toward admitting.
    async fn run_report(&self, charges: &[Charge], now_ns: u64) -> Result<Outcome, StoreError> {
        let first = first_mentions(charges);
        let groups = self.groups(charges, &first);
        let mut loaded = vec![Gcra::default(); charges.len()];
        for group in &groups {
            self.charge_group(
                "report",
                group,
                charges,
                &first,
                0,
                false,
                now_ns,
                &mut loaded,
            )
            .await?;
        }
        let states: Vec<Gcra> = (0..charges.len()).map(|i| loaded[first[i]]).collect();
        Ok(decide_report(charges, &states, now_ns).outcome)
    }

    /// A refund: every group's TATs move back by what its mentions cost (the script's
    /// `refund` mode, which never moves a TAT before now), then the states are read for the
    /// statuses. A failed group is reported to the caller, which keeps the refund for the
    /// next tick: at worst a bucket refuses a little early, never admits more.
    async fn run_refund(&self, charges: &[Charge], now_ns: u64) -> Result<Outcome, StoreError> {
        let first = first_mentions(charges);
        let groups = self.groups(charges, &first);
        let mut loaded = vec![Gcra::default(); charges.len()];
        for group in &groups {
            self.refund_group(group, charges, &first, Refund::Request { grant: 0 }, now_ns)
                .await?;
            self.read_group(group, charges, &mut loaded).await?;
        }
        let states: Vec<Gcra> = (0..charges.len()).map(|i| loaded[first[i]]).collect();
        // The states already hold the refund: describe them as they stand.
        let zero: Vec<Charge> = charges
            .iter()
            .map(|c| Charge {
                cost: 0,
                ..c.clone()
            })
            .collect();
        Ok(decide_report(&zero, &states, now_ns).outcome)
    }

    async fn run(
        &self,
        charges: &[Charge],
        lease: u32,
        now_ns: u64,
    ) -> Result<Outcome, StoreError> {
        let first = first_mentions(charges);
        let groups = self.groups(charges, &first);
        // States by first-mention index (other indices are filled from them below).
        let mut loaded = vec![Gcra::default(); charges.len()];
        let mut charged: Vec<(usize, u32)> = Vec::new();
        let mut refused_at: Option<usize> = None;
        // Slots only for a request confined to one tenant's hash tag (`store::slotted`),
        // which is one script call: across hash slots the grant is settled after the
        // scripts ran, and no one script knows the room that leaves (docs/storage.md).
        let slots = lease > 0 && groups.len() == 1 && super::slotted(charges);
        let mut given: Vec<(u64, u64)> = Vec::new();

        for (gi, group) in groups.iter().enumerate() {
            match self
                .charge_group(
                    "charge",
                    group,
                    charges,
                    &first,
                    lease,
                    slots,
                    now_ns,
                    &mut loaded,
                )
                .await
            {
                Ok(c) if c.admitted => {
                    charged.push((gi, c.grant));
                    given = c.slots;
                }
                Ok(_) => {
                    refused_at = Some(gi);
                    break;
                }
                Err(e) => {
                    self.refund_all(&groups, &charged, charges, &first, now_ns)
                        .await;
                    return Err(e);
                }
            }
        }

        let mut grant = 0;
        match refused_at {
            Some(gi) => {
                // All or nothing across slots: undo the groups already charged.
                self.refund_all(&groups, &charged, charges, &first, now_ns)
                    .await;
                for group in &groups[gi + 1..] {
                    self.read_group(group, charges, &mut loaded).await?;
                }
            }
            None => {
                grant = charged.iter().map(|&(_, g)| g).min().unwrap_or(0);
                // Each group sized its lease by its own tightest bucket; the request's lease
                // is the smallest of those (lease_size is monotone), so give back the excess.
                for &(gi, g) in &charged {
                    if g > grant {
                        let refund = Refund::Grant(g - grant);
                        if let Err(e) = self
                            .refund_group(&groups[gi], charges, &first, refund, now_ns)
                            .await
                        {
                            log::warn!(
                                "could not return {} lease units to slot group {gi}: {e}",
                                g - grant
                            );
                        }
                    }
                }
            }
        }

        let states: Vec<Gcra> = (0..charges.len()).map(|i| loaded[first[i]]).collect();
        let admitted = refused_at.is_none();
        // The old tails by first-mention index (the one group's keys, in order).
        let mut tails = vec![0u64; charges.len()];
        let mut script_holds = vec![0u64; charges.len()];
        if let Some(group) = groups.first().filter(|_| slots && !given.is_empty()) {
            for (&k, &(tail, hold)) in group.keys.iter().zip(&given) {
                tails[k] = tail;
                script_holds[k] = hold;
            }
        }
        let tails: Vec<u64> = (0..charges.len()).map(|i| tails[first[i]]).collect();
        let decision = decide_slotted(
            charges,
            &states,
            (slots && !given.is_empty()).then_some(&tails[..]),
            lease,
            now_ns,
        );
        let holds: Vec<u64> = decision.outcome.buckets.iter().map(|b| b.hold_ns).collect();
        let script_holds: Vec<u64> = (0..charges.len()).map(|i| script_holds[first[i]]).collect();
        if admitted && slots && !given.is_empty() && holds != script_holds {
            log::error!(
                "BUG: the Redis script and store::decide_slotted disagree on slots (script: \
                 {script_holds:?}; decide: {holds:?}) for keys {:?}",
                charges.iter().map(|c| &c.key).collect::<Vec<_>>()
            );
        }
        debug_assert_eq!(
            (decision.outcome.admitted, decision.outcome.grant),
            (admitted, grant),
            "the Redis script and store::decide disagree"
        );
        if decision.outcome.admitted != admitted || decision.outcome.grant != grant {
            log::error!(
                "BUG: the Redis script and store::decide disagree (script: admitted={admitted} \
                 grant={grant}; decide: admitted={} grant={}) for keys {:?}",
                decision.outcome.admitted,
                decision.outcome.grant,
                charges.iter().map(|c| &c.key).collect::<Vec<_>>()
            );
        }
        let mut outcome = decision.outcome;
        // What Redis holds is what the script did.
        outcome.admitted = admitted;
        outcome.grant = grant;
        if slots && !given.is_empty() {
            for (status, hold) in outcome.buckets.iter_mut().zip(script_holds) {
                status.hold_ns = hold;
            }
        }
        Ok(outcome)
    }

    /// Best-effort refund of every group charged so far. A failed refund leaves that
    /// group over-charged (it refuses a little early until the charge drains); it never
    /// admits more than the limit.
    async fn refund_all(
        &self,
        groups: &[Group],
        charged: &[(usize, u32)],
        charges: &[Charge],
        first: &[usize],
        now_ns: u64,
    ) {
        for &(gi, grant) in charged {
            let refund = Refund::Request { grant };
            if let Err(e) = self
                .refund_group(&groups[gi], charges, first, refund, now_ns)
                .await
            {
                log::warn!("could not refund slot group {gi} of a refused request: {e}");
            }
        }
    }
}

/// What to give back to a group.
#[derive(Debug, Clone, Copy)]
enum Refund {
    /// Everything the request charged, and its grant.
    Request { grant: u32 },
    /// Only this many lease units.
    Grant(u32),
}

fn parse_tat(key: &str, value: &Value) -> Result<Gcra, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.to_string(),
        reason,
    };
    let text = match value {
        Value::Nil => return Ok(Gcra::default()),
        Value::BulkString(bytes) => std::str::from_utf8(bytes)
            .map_err(|_| corrupt("state is not UTF-8".into()))?
            .to_string(),
        Value::SimpleString(s) => s.clone(),
        other => return Err(corrupt(format!("state is not a string: {other:?}"))),
    };
    text.parse::<u64>()
        .map(Gcra::from_tat)
        .map_err(|_| corrupt(format!("`{text}` is not a TAT in nanoseconds")))
}

/// Errors after which the connection itself is suspect.
fn is_connection_level(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound | ErrorKind::ClientError
        )
}

fn classify(e: &RedisError, timeout: Duration) -> StoreError {
    if e.is_timeout() {
        return StoreError::Timeout(timeout);
    }
    if e.code() == Some("LGCORRUPT") {
        let detail = e.detail().unwrap_or_default();
        return StoreError::Corrupt {
            key: detail.split(' ').next().unwrap_or_default().to_string(),
            reason: detail.to_string(),
        };
    }
    match e.kind() {
        ErrorKind::IoError
        | ErrorKind::TryAgain
        | ErrorKind::ClusterDown
        | ErrorKind::MasterDown
        | ErrorKind::BusyLoadingError
        | ErrorKind::ReadOnly
        | ErrorKind::ClusterConnectionNotFound
        | ErrorKind::Moved
        | ErrorKind::Ask => StoreError::Unavailable(e.to_string()),
        _ if e.is_unrecoverable_error() => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Backend(e.to_string()),
    }
}

/// The usage ledger in Redis: one hash per hour, `laneguard:usage:v1:{h<HOUR>}` (the
/// hour is the hash tag, so one hour's rows live on one node), whose fields are
/// `<tenant>/<class>/<column>` (names escaped with `laneguard_core::usage::escape`) and
/// whose values are counts. Nothing expires: a billing ledger is kept until an operator
/// removes hours (`DEL`) after exporting them.
pub fn usage_key(hour: u64) -> String {
    format!("laneguard:usage:v1:{{h{hour}}}")
}

/// One HINCRBY per field, in one script so that a batch is added whole or not at all (a
/// failed flush is retried; a half-applied one would be counted twice).
const USAGE_LUA: &str = r#"
for i = 1, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"#;

/// The most hours one export reads (one `HGETALL` each): a little over a year.
pub const MAX_USAGE_HOURS: u64 = 24 * 400;

impl RedisStore {
    async fn add_usage_rows(&self, rows: &[(UsageKey, UsageRow)]) -> Result<(), StoreError> {
        let mut by_hour: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
        for (k, r) in rows {
            let args = by_hour.entry(k.hour).or_default();
            let prefix = format!(
                "{}/{}/",
                laneguard_core::usage::escape(&k.tenant),
                laneguard_core::usage::escape(&k.class)
            );
            for (field, value) in r.fields() {
                if value > 0 {
                    args.push(format!("{prefix}{field}"));
                    args.push(value.to_string());
                }
            }
        }
        for (hour, args) in by_hour {
            if args.is_empty() {
                continue;
            }
            let key = usage_key(hour);
            let mut inv = self.usage_script.key(&key);
            for a in &args {
                inv.arg(a);
            }
            self.invoke::<i64>(&inv).await?;
        }
        Ok(())
    }

    async fn usage_rows(
        &self,
        from_hour: u64,
        to_hour: u64,
    ) -> Result<Vec<(UsageKey, UsageRow)>, StoreError> {
        if to_hour.saturating_sub(from_hour) > MAX_USAGE_HOURS {
            return Err(StoreError::Backend(format!(
                "a usage export reads at most {MAX_USAGE_HOURS} hours; asked for {}",
                to_hour - from_hour
            )));
        }
        let mut ledger = laneguard_core::usage::Ledger::default();
        for hour in from_hour..to_hour {
            let key = usage_key(hour);
            let fields: Vec<(String, u64)> = self.query(redis::cmd("HGETALL").arg(&key)).await?;
            for (field, value) in fields {
                let corrupt = |reason: &str| StoreError::Corrupt {
                    key: key.clone(),
                    reason: format!("field `{field}`: {reason}"),
                };
                let mut parts = field.split('/');
                let (Some(t), Some(c), Some(column), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Err(corrupt("not TENANT/CLASS/COLUMN"));
                };
                let (Some(tenant), Some(class)) = (
                    laneguard_core::usage::unescape(t),
                    laneguard_core::usage::unescape(c),
                ) else {
                    return Err(corrupt("bad escape"));
                };
                let mut row = UsageRow::default();
                if !row.set(column, value) {
                    return Err(corrupt("unknown column"));
                }
                ledger.add(
                    UsageKey {
                        hour,
                        tenant,
                        class,
                    },
                    &row,
                );
            }
        }
        Ok(ledger.rows(from_hour, to_hour))
    }
}

impl Store for RedisStore {
    fn name(&self) -> &'static str {
        match self.target {
            Target::Standalone(_) => "redis",
            Target::Cluster(_) => "redis-cluster",
        }
    }

    fn check_and_charge<'a>(
        &'a self,
        charges: &'a [Charge],
        lease: u32,
        now_ns: u64,
    ) -> StoreFuture<'a, Outcome> {
        Box::pin(async move {
            if charges.is_empty() {
                return Ok(decide(charges, &[], lease, now_ns).outcome);
            }
            self.run(charges, lease, now_ns).await
        })
    }

    fn report<'a>(&'a self, charges: &'a [Charge], now_ns: u64) -> StoreFuture<'a, Outcome> {
        Box::pin(async move {
            if charges.is_empty() {
                return Ok(decide_report(charges, &[], now_ns).outcome);
            }
            self.run_report(charges, now_ns).await
        })
    }

    fn probe(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            if self.is_cluster() {
                self.probe_cluster().await
            } else {
                self.ping().await
            }
        })
    }

    fn refund<'a>(&'a self, charges: &'a [Charge], now_ns: u64) -> StoreFuture<'a, Outcome> {
        Box::pin(async move {
            if charges.is_empty() {
                return Ok(decide_refund(charges, &[], now_ns).outcome);
            }
            self.run_refund(charges, now_ns).await
        })
    }

    fn add_usage<'a>(&'a self, rows: &'a [(UsageKey, UsageRow)]) -> StoreFuture<'a, ()> {
        Box::pin(self.add_usage_rows(rows))
    }

    fn usage(&self, from_hour: u64, to_hour: u64) -> StoreFuture<'_, Vec<(UsageKey, UsageRow)>> {
        Box::pin(self.usage_rows(from_hour, to_hour))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        // An empty tag hashes the whole key.
        assert_eq!(slot("foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
    }

    #[test]
    fn a_slot_key_lives_in_its_buckets_hash_slot() {
        let tenant = laneguard_core::key::encode("d", &[("tenant", "acme"), ("bucket", "shared")]);
        let model =
            laneguard_core::key::encode("d", &[("model", "gpt"), ("bucket", "model_total")]);
        for key in [tenant, model] {
            let sk = slot_key(&key);
            assert_ne!(sk, key);
            assert_eq!(slot(&sk), slot(&key), "{sk}");
        }
    }

    #[test]
    fn tenant_keys_share_a_slot() {
        use laneguard_core::key::encode;
        let shared = encode("laneguard", &[("tenant", "acme"), ("bucket", "shared")]);
        let user = encode(
            "laneguard",
            &[("tenant", "acme"), ("bucket", "user"), ("user", "{x}")],
        );
        assert_eq!(slot(&shared), slot(&user));
        assert_eq!(slot(&shared), slot("acme"));
    }

    #[test]
    fn cluster_specs() {
        assert_eq!(
            cluster_nodes("redis-cluster://a:1,b:2"),
            Some(vec!["redis://a:1".to_string(), "redis://b:2".to_string()])
        );
        assert_eq!(cluster_nodes("redis-cluster://"), None);
        assert_eq!(cluster_nodes("redis-cluster://a:1,,b:2"), None);
        assert_eq!(cluster_nodes("redis-cluster://a:1/0"), None);
        assert_eq!(cluster_nodes("redis://a:1"), None);
    }

    #[test]
    fn errors_are_classified() {
        let t = Duration::from_millis(5);
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(classify(&refused, t).is_transient());
        assert!(is_connection_level(&refused));
        let timed_out = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(matches!(classify(&timed_out, t), StoreError::Timeout(_)));
        for kind in [
            ErrorKind::TryAgain,
            ErrorKind::ClusterDown,
            ErrorKind::MasterDown,
            ErrorKind::BusyLoadingError,
        ] {
            let e = RedisError::from((kind, "server says so"));
            assert!(classify(&e, t).is_transient(), "{kind:?}");
        }
        let script = RedisError::from((ErrorKind::ResponseError, "script error"));
        assert!(!classify(&script, t).is_transient());
    }

    #[test]
    fn tat_values_parse_or_are_corrupt() {
        assert_eq!(parse_tat("k", &Value::Nil).unwrap(), Gcra::default());
        assert_eq!(
            parse_tat("k", &Value::BulkString(b"1700000000123456789".to_vec())).unwrap(),
            Gcra::from_tat(1_700_000_000_123_456_789)
        );
        assert!(matches!(
            parse_tat("k", &Value::BulkString(b"soon".to_vec())),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
