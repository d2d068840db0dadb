//! Operators of the FrameWorks pipeline: decode, enrich and route events into table rows.

pub mod route;

pub use route::{RouteError, route};
