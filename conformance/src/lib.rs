//! Conformance harness: starts real mvps-te processes and drives real NBD clients.
