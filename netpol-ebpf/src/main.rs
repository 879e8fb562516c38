#![no_std]
#![no_main]

mod lxc;
mod maps;
mod masq6;
mod parse;

use aya_ebpf::{macros::classifier, programs::TcContext};
use netpol_common::Direction;

/// Host veth ingress: what the container sends (its egress policy).
#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    lxc::run(&ctx, Direction::Egress)
}

/// Host veth egress: what is delivered to the container (its ingress policy).
#[classifier]
pub fn to_container(ctx: TcContext) -> i32 {
    lxc::run(&ctx, Direction::Ingress)
}

/// Uplink egress: IPv6 masquerade of container prefixes (SNAT).
#[classifier]
pub fn masq6_out(ctx: TcContext) -> i32 {
    masq6::run(&ctx, true)
}

/// Uplink ingress: replies and ICMPv6 errors translated back to the containers.
#[classifier]
pub fn masq6_in(ctx: TcContext) -> i32 {
    masq6::run(&ctx, false)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
