//! One module per subcommand: flags, settings resolution, and what it prints.

pub(crate) mod bench;
pub(crate) mod connect;
pub(crate) mod lab;
pub(crate) mod plan;
pub(crate) mod probe;
pub(crate) mod proxy;
pub(crate) mod serve;
pub(crate) mod tunnel;
