//! Sans-I/O protocol codecs.
//!
//! Bytes in, packets out, and back: this crate parses and serialises wire formats and validates
//! everything the specifications make the decoder responsible for (fixed-header flags, lengths,
//! property sets, UTF-8). It performs no I/O, keeps no connection state and knows nothing of tokio;
//! the adapters own sockets and sessions. Every decoder is fuzzed (`fuzz/`) and round-trip tested.
//!
//! - [`mqtt`]: MQTT 3.1.1 and 5.0, every control packet and property.

pub mod mqtt;
