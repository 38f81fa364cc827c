//! Arbitrary bytes read as a stored envelope and as an invalidation message: never a panic;
//! whatever decodes encodes back to the same bytes. Each input is also tried behind a valid
//! header, so that the paths past the magic and version checks get fuzzed on every run.
#![no_main]

use bytes::Bytes;
use cachet::envelope::Envelope;
use cachet::invalidation::Message;
use libfuzzer_sys::fuzz_target;

fn check_envelope(stored: Bytes) {
    if let Ok(envelope) = Envelope::decode("fuzz", &stored) {
        assert_eq!(envelope.encode(), stored, "envelope round trip");
        let _ = envelope.remaining();
    }
}

fn check_message(data: &[u8]) {
    if let Ok(message) = Message::decode(data) {
        assert_eq!(message.encode(), data, "message round trip");
    }
}

fuzz_target!(|data: &[u8]| {
    check_envelope(Bytes::copy_from_slice(data));
    check_message(data);

    let mut enveloped = b"CE\x01".to_vec();
    enveloped.extend_from_slice(data);
    check_envelope(Bytes::from(enveloped));
    let mut message = b"CI\x01".to_vec();
    message.extend_from_slice(data);
    check_message(&message);
});
