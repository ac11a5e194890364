//! Reading an API request, shared by every endpoint family: the JSON body and its typed views
//! ([`body`]), the vLLM fields Lumen checks but does not act on ([`fields`]), the sampling and
//! stopping parameters ([`params`]), the prompt shapes ([`prompts`]) and structured outputs
//! ([`structured`]). Everything here turns JSON into protocol messages or a 400 naming the field;
//! nothing here talks to the backend.

pub mod body;
pub mod fields;
pub mod params;
pub mod prompts;
pub mod structured;
