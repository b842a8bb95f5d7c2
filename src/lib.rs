//! vlad: a vision-language agent daemon with an embedded Qwen2-VL engine.
//!
//! Modules follow the agent's loop: [`engine`] runs the model; the protocol turns model text into
//! actions; environments perform them.

pub mod action;
pub mod agent;
mod aligned_alloc;
pub mod daemon;
pub mod engine;
pub mod environment;
pub mod grounding;
pub mod mcp;
pub mod model;
pub mod protocol;
pub mod report;
pub mod script;
pub mod tools;

/// Large blocks start on a cache line (see [`aligned_alloc`]): the CPU kernels read activations
/// as whole lines.
#[global_allocator]
static ALLOCATOR: aligned_alloc::CacheLineAligned = aligned_alloc::CacheLineAligned;
