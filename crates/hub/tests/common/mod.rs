//! The fake hub lives in the crate (`tptt_hub::testing`, feature `testing`) so the desktop
//! app's tests can use it too.

#![allow(unused_imports)]

pub use tptt_hub::testing::*;
