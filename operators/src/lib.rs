//! Operators of the FrameWorks pipeline: decode, enrich and route events into table rows, and
//! the `stream_analytics` reduction rules.

pub mod encode;
pub mod route;
pub mod stream_analytics;
pub mod stream_state;
pub mod usage;

pub use encode::{EncodedRow, RowEncoders};
pub use route::{RouteError, Routed, route};
pub use stream_analytics::StreamAnalytics;
pub use stream_state::{Change, StateError, StateEvent, StreamKey, StreamState, state_key};
pub use usage::{USAGE_TYPES, UsageFact, UsageWindows, usage_facts};
