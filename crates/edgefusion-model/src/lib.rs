//! The model as the runtime runs it.
