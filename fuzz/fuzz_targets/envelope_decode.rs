//! Arbitrary bytes read as a stored envelope and as an invalidation message: never a panic;
//! whatever decodes encodes back to the same bytes.
#![no_main]

use bytes::Bytes;
use cachet::envelope::Envelope;
use cachet::invalidation::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let stored = Bytes::copy_from_slice(data);
    if let Ok(envelope) = Envelope::decode("fuzz", &stored) {
        assert_eq!(envelope.encode(), stored, "envelope round trip");
        let _ = envelope.remaining();
    }
    if let Ok(message) = Message::decode(data) {
        assert_eq!(message.encode(), data, "message round trip");
    }
});
