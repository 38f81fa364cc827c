//! Arbitrary bytes read as a stored envelope, as a `get_or_load` frame (and through the typed
//! read that understands frames) and as an invalidation message: never a panic; whatever
//! decodes encodes back to the same bytes. Each input is also tried behind a valid
//! header, so that the paths past the magic and version checks get fuzzed on every run.
#![no_main]

use bytes::Bytes;
use cachet::envelope::Envelope;
use cachet::invalidation::Message;
use cachet::load::{Frame, decode_stored};
use libfuzzer_sys::fuzz_target;

fn check_envelope(stored: Bytes) {
    if let Ok(envelope) = Envelope::decode("fuzz", &stored) {
        assert_eq!(envelope.encode(), stored, "envelope round trip");
        let _ = envelope.remaining();
    }
}

fn check_frame(stored: Bytes) {
    if let Ok(frame) = Frame::decode("fuzz", &stored) {
        assert_eq!(frame.encode(), stored, "frame round trip");
        assert!(!frame.absent || frame.payload.is_empty());
    }
    let _ = decode_stored::<Vec<(String, u32)>>("fuzz", &stored);
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
    check_frame(Bytes::copy_from_slice(data));
    let mut framed = b"\0cf\x01".to_vec();
    framed.extend_from_slice(data);
    check_frame(Bytes::from(framed));
    let mut message = b"CI\x01".to_vec();
    message.extend_from_slice(data);
    check_message(&message);
});
