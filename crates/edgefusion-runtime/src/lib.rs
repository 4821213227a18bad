//! CPU inference engine.
