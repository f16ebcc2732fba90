#![no_std]
// This file exists so that netprobe can name this crate as a build-dependency (cargo then rebuilds
// netprobe when the kernel programs change); the programs themselves are the `netprobe` binary.
