//! Lumen's head: the deployment registry, the controller, the router, the OpenAI-compatible API
//! on port 8000 and the control API plus dashboard on port 8265.
//!
//! It talks to workers only through the gRPC protocol in `lumen-proto`.
