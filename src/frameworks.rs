//! The FrameWorks ingest pipeline: Kafka → decode and route (per the event contract) → one
//! exactly-once ClickHouse table per event type, usage windows into `usage_records`, the
//! `stream_analytics` reducer in PostgreSQL when it is configured, and a dead-letter topic for
//! what cannot be decoded or routed. Everything else (configuration, services, batching,
//! exactly once) is the worker shell's.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_operators::{
    EncodedRow, RowEncoders, StateEvent, StreamAnalytics, UsageFact, UsageWindows,
};
use sluice_pipeline::{DeadLetter, DecodePort, Decoded, KafkaRecord, Stage, WindowSpec};
use sluice_schemas::TableRow;
use sluice_schemas::rows::{
    ConnectionEventRow, NodeMetricRow, RoutingEventRow, RowBytes, StreamEventRow, StreamHealthRow,
    TrackListRow, UsageRow, ViewerMetricRow,
};
use sluice_sinks::{Encoded, Native};
use sluice_worker::enrich::{Geo, MaxMind, is_public};
use sluice_worker::{BoxError, ConfigError, Settings, Table, Wiring, invalid};
use smallvec::SmallVec;

/// `[frameworks]`: the usage windows and the cluster id they are written with.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrameWorks {
    /// Cluster id written to `usage_records`.
    pub cluster_id: String,
    /// `usage_records` window length, seconds.
    pub usage_window_secs: u64,
    /// How far behind the latest event time a usage event may be and still join its window,
    /// seconds; later ones are counted in one more row for that window.
    pub usage_lateness_secs: u64,
    /// A usage window still open after this many seconds of wall time closes anyway (idle
    /// partitions).
    pub usage_max_open_secs: u64,
}

impl Default for FrameWorks {
    fn default() -> Self {
        Self {
            cluster_id: "default".into(),
            usage_window_secs: 60,
            usage_lateness_secs: 30,
            usage_max_open_secs: 150,
        }
    }
}

impl Settings for FrameWorks {
    const SECTION: &'static str = "frameworks";

    fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("frameworks.usage_window_secs", self.usage_window_secs),
            ("frameworks.usage_max_open_secs", self.usage_max_open_secs),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// What one record becomes: its table rows (encoded for their tables), and its effect on
/// `stream_analytics` when reduction is on and its type is reduced.
#[derive(Debug, Default)]
pub struct Processed {
    /// ClickHouse rows.
    pub rows: SmallVec<[EncodedRow; 2]>,
    /// The reducer's view of the event.
    pub state: Option<StateEvent>,
    /// Its usage figures, for `usage_records`.
    pub usage: Vec<UsageFact>,
}

/// Why a record is a dead letter: the stage, a short stable reason, the error.
pub type Rejected = (&'static str, &'static str, String);

/// Decodes, routes and encodes one record (with `encoders`, the worker's), and prepares its
/// reduction when `reduce`; or says why it is a dead letter. The rows are encoded straight
/// from the record's bytes: nothing of them is owned in between. With `geoip`, a
/// `connection_events` row gets its viewer's geography before it is encoded.
pub fn process(
    record: &KafkaRecord,
    reduce: bool,
    geoip: Option<&ViewerGeo>,
    encoders: &mut RowEncoders,
) -> Result<Processed, Rejected> {
    let Some(value) = record.value.as_deref() else {
        return Err(("decode", "empty", "record has no value".into()));
    };
    let event =
        sluice_schemas::Event::decode(value, record.header("tenant_id").map(|h| h.as_ref()))
            .map_err(|e| {
                let reason = match &e {
                    sluice_schemas::DecodeError::Empty => "empty",
                    sluice_schemas::DecodeError::Json(_) => "invalid_json",
                    sluice_schemas::DecodeError::NotObject(_) => "not_an_object",
                    sluice_schemas::DecodeError::Missing(_) => "missing_field",
                    sluice_schemas::DecodeError::Invalid { .. } => "invalid_field",
                    sluice_schemas::DecodeError::UnknownType(_) => "unknown_type",
                };
                ("decode", reason, e.to_string())
            })?;
    let routed = sluice_operators::route(&event).map_err(|e| {
        let reason = match &e {
            sluice_operators::RouteError::Missing { .. } => "missing_field",
            sluice_operators::RouteError::NotNumber { .. } => "not_a_number",
            sluice_operators::RouteError::OutOfRange { .. } => "out_of_range",
            sluice_operators::RouteError::Invalid { .. } => "invalid_field",
        };
        ("route", reason, e.to_string())
    })?;
    let mut rows = SmallVec::new();
    for row in routed {
        // Declared before the row, which may borrow its city.
        let geo;
        let row = match (row, geoip) {
            (TableRow::ConnectionEvent(mut r), Some(geoip)) => {
                geo = geoip.locate(&r.connection_addr);
                if let Some(geo) = &geo {
                    locate(&mut r, geo);
                }
                TableRow::ConnectionEvent(r)
            }
            (row, _) => row,
        };
        rows.push(
            encoders
                .encode(&row)
                .map_err(|e| ("encode", "unencodable", e.to_string()))?,
        );
    }
    let state = if reduce {
        StateEvent::from_event(&event).map_err(|e| ("reduce", "invalid_field", e.to_string()))?
    } else {
        None
    };
    let usage = sluice_operators::usage_facts(&event);
    Ok(Processed { rows, state, usage })
}

/// The GeoIP key of a `connection_events` row: its `connection_addr` (an address, or an
/// address and port), when public.
fn viewer_address(addr: &str) -> Option<std::net::IpAddr> {
    let addr = addr.trim();
    let ip = addr
        .parse()
        .ok()
        .or_else(|| addr.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))?;
    is_public(ip).then_some(ip)
}

/// Viewer geography for `connection_events`, asked in-line by the decode workers (one clone
/// each). The database is local and memory-mapped, and [`MaxMind`] decodes each of its
/// records once, so a lookup costs a fraction of a microsecond: less than what an enrich stage
/// of its own would add (each row owned to wait for it, a queue hop, an encode stage; 0.56 CPU s
/// per million records more in `sluice run --drain`, medians of six alternating runs, README).
#[derive(Clone)]
pub struct ViewerGeo {
    db: std::sync::Arc<MaxMind>,
    located: metrics::Counter,
    unknown: metrics::Counter,
    failed: metrics::Counter,
}

impl ViewerGeo {
    /// Looks viewers up in `db`, counting the answers in `sluice_geoip_lookups_total`
    /// (`result` = `located`, `unknown`, `failed`).
    pub fn new(db: MaxMind) -> Self {
        let counter = |result: &'static str| metrics::counter!("sluice_geoip_lookups_total", "result" => result);
        Self {
            db: std::sync::Arc::new(db),
            located: counter("located"),
            unknown: counter("unknown"),
            failed: counter("failed"),
        }
    }

    /// What the database knows of the viewer at `addr` (an address, or an address and port);
    /// nothing for private or unknown addresses. A failed lookup (a damaged database) leaves the
    /// row without geography rather than the record unwritten, and is logged and counted.
    fn locate(&self, addr: &str) -> Option<Geo> {
        let ip = viewer_address(addr)?;
        match self.db.locate(ip) {
            Ok(Some(geo)) => {
                self.located.increment(1);
                Some(geo)
            }
            Ok(None) => {
                self.unknown.increment(1);
                None
            }
            Err(e) => {
                self.failed.increment(1);
                tracing::warn!(addr, error = %e, "GeoIP lookup failed; the row keeps empty geo columns");
                None
            }
        }
    }
}

/// Writes what the database knows of a viewer into the row's geo columns (the contract's
/// optional viewer geography); what it does not know stays empty or zero.
fn locate<'a>(row: &mut ConnectionEventRow<'a>, geo: &'a Geo) {
    if let [a, b] = geo.country_code.as_bytes() {
        row.country_code = [*a, *b];
    }
    row.city = std::borrow::Cow::Borrowed(&geo.city);
    row.latitude = geo.latitude.unwrap_or_default();
    row.longitude = geo.longitude.unwrap_or_default();
}

/// One decode output per event table, and what wires each into ClickHouse: made from the one
/// table list (`sluice_schemas::with_event_tables!`).
macro_rules! event_tables {
    ($($variant:ident: $row:ident = $table:literal,)*) => {
        /// A decode output per event table.
        #[allow(non_snake_case)]
        #[derive(Clone, Copy)]
        struct Tables {
            $($variant: DecodePort<Encoded<$row<'static>>>,)*
        }

        impl Tables {
            /// Adds an output per table to `decode` and wires each into its table.
            fn wire(
                decode: &mut sluice_pipeline::Decode,
                w: &mut Wiring<'_, FrameWorks>,
            ) -> Result<Self, BoxError> {
                $(
                    let (port, rows) = decode.output::<Encoded<$row<'static>>>($table);
                    let $variant = port;
                    w.into_clickhouse(rows, table::<$row<'static>>($table))?;
                )*
                Ok(Self { $($variant,)* })
            }

            /// Sends `row` to its table's output.
            fn push(&self, out: &mut Decoded<'_>, row: EncodedRow) {
                match row {
                    $(EncodedRow::$variant(r) => out.push(&self.$variant, r),)*
                }
            }
        }
    };
}

sluice_schemas::with_event_tables!(event_tables);

/// A FrameWorks event table: rows encoded from the record, counted by their bytes in the
/// batch limits, inserted as Native blocks; a row check after a ClickHouse crash looks only at the batch's range of
/// `timestamp`.
fn table<R>(name: &str) -> Table<Encoded<R>, Native<R>>
where
    R: clickhouse::Row + clickhouse::RowWrite + 'static,
    R::Value<'static>: Default,
    for<'r> R::Value<'r>: Send + Sync,
{
    Table::encoded(name).check_range("timestamp")
}

/// Wires the FrameWorks graph.
///
/// With PostgreSQL configured, events are also reduced into `stream_analytics` (one writer,
/// exactly once through `sluice_applied_offsets`).
pub fn build(w: &mut Wiring<'_, FrameWorks>) -> Result<(), BoxError> {
    let settings = w.settings().clone();
    let reduce = w.postgres_enabled();
    let geoip = w.geoip()?.map(ViewerGeo::new);
    let mut decode = w.decode(Stage::new("decode").workers(2))?;
    let tables = Tables::wire(&mut decode, w)?;
    let (usage, usage_facts) = decode.output::<UsageFact>("usage_records");
    let states = if reduce {
        let (port, states) = decode.output::<StateEvent>("stream_analytics");
        w.reduce_into_postgres(states, "stream_analytics", StreamAnalytics)?;
        Some(port)
    } else {
        None
    };
    decode.run(move || {
        let mut encoders = RowEncoders::default();
        let geoip = geoip.clone();
        move |record: KafkaRecord, out: &mut Decoded<'_>| match process(
            &record,
            reduce,
            geoip.as_ref(),
            &mut encoders,
        ) {
            Ok(Processed {
                rows,
                state,
                usage: facts,
            }) => {
                for row in rows {
                    tables.push(out, row);
                }
                if let (Some(port), Some(state)) = (&states, state) {
                    out.push(port, state);
                }
                for fact in facts {
                    out.push(&usage, fact);
                }
            }
            Err((stage, reason, error)) => out.push_dead(DeadLetter {
                record,
                error,
                stage,
                reason,
            }),
        }
    });
    let spec = WindowSpec {
        length: Duration::from_secs(settings.usage_window_secs),
        allowed_lateness: Duration::from_secs(settings.usage_lateness_secs),
        max_open: Duration::from_secs(settings.usage_max_open_secs),
    };
    // Gathered windows are checked row by row after a ClickHouse crash; `UsageWindows::stamp`
    // makes every window's rows differ (two windows' sums are often equal, their sources
    // never are).
    let windows = UsageWindows {
        cluster_id: settings.cluster_id,
        window_secs: settings.usage_window_secs,
    };
    w.window_into_clickhouse(
        usage_facts,
        Table::<UsageRow>::new("usage_records")
            .size_of(UsageRow::row_bytes)
            .check_range("timestamp"),
        spec,
        windows,
    )?;
    Ok(())
}
