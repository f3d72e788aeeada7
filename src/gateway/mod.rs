//! The gateway path of one proxied request: `handle` (in order: shed, auth,
//! body, parse, limits, the stack, the reply), client keys (`auth`), and the
//! request's record (`record`).

pub mod auth;
mod cached;
pub mod handle;
pub mod passthrough;
pub mod record;
pub mod state;
pub mod stream;
