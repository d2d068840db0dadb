//! Any bytes as a record value (and, when the first byte is odd, a `tenant_id` header cut from
//! the input) through decode, route, the state reducer's event and the usage facts: none of
//! them may panic, whatever the input. Decoding is also checked to be deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_operators::{StateEvent, route, usage_facts};
use sluice_schemas::Event;

fuzz_target!(|data: &[u8]| {
    let (header, value) = match data.split_first() {
        Some((flags, rest)) if flags & 1 == 1 => {
            let cut = usize::from(flags >> 1).min(rest.len());
            (Some(&rest[..cut]), &rest[cut..])
        }
        Some((_, rest)) => (None, rest),
        None => (None, data),
    };
    let first = Event::decode(value, header);
    let again = Event::decode(value, header);
    assert_eq!(first.is_ok(), again.is_ok(), "decoding is deterministic");
    if let Ok(event) = first {
        let _ = route(&event);
        let _ = StateEvent::from_event(&event);
        let _ = usage_facts(&event);
    }
});
