//! Operators of the FrameWorks pipeline: decode, enrich and route events into table rows.
