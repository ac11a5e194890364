//! The engine: a dedicated thread per device running the step loop, behind a ractor actor.
