//! The edge: client connections (`server`), the HTTP surface (`routes`),
//! and the endpoints beside the proxied path (`admin`, `health`, `status`).

pub mod admin;
pub mod health;
pub mod routes;
pub mod server;
pub mod status;
