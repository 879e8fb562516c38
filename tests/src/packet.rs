//! A small packet builder for the program tests: Ethernet, ARP, IPv4, IPv6 (with extension
//! headers), TCP, UDP, ICMP and ICMPv6, assembled by hand so a test can also build broken ones.
//! Checksums of the IPv4 header are filled in; L4 checksums are not (the datapath never reads
//! them).

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// MAC addresses of the two ends of a test frame (they mean nothing to the datapath).
pub const MAC_A: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];
pub const MAC_B: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x03];

/// An Ethernet frame around `payload`.
pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&MAC_B);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP request "who has `target`, tell `sender`" (Ethernet/IPv4).
pub fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut a = Vec::with_capacity(28);
    a.extend_from_slice(&1u16.to_be_bytes()); // htype Ethernet
    a.extend_from_slice(&ETH_P_IP.to_be_bytes());
    a.push(6);
    a.push(4);
    a.extend_from_slice(&1u16.to_be_bytes()); // request
    a.extend_from_slice(&MAC_A);
    a.extend_from_slice(&sender);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target);
    eth(ETH_P_ARP, &a)
}

/// The fields of an IPv4 header a test may want to break.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    /// Header length in 32-bit words (5 without options).
    pub ihl: u8,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
    pub more_fragments: bool,
    /// The identification field (fragments of one datagram share it).
    pub id: u16,
    /// Overrides the total length (otherwise header + payload).
    pub tot_len: Option<u16>,
}

impl Ipv4 {
    pub fn new(src: [u8; 4], dst: [u8; 4], proto: u8) -> Self {
        Self {
            src,
            dst,
            proto,
            ihl: 5,
            frag_offset: 0,
            more_fragments: false,
            id: 0x1234,
            tot_len: None,
        }
    }

    /// The header (with `ihl * 4 - 20` zero option bytes when `ihl > 5`) followed by `payload`.
    /// An `ihl` below 5 still writes the 20 fixed bytes.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let hlen = (self.ihl as usize * 4).max(20);
        let mut h = vec![0u8; hlen];
        h[0] = 0x40 | (self.ihl & 0x0f);
        let tot = self.tot_len.unwrap_or((hlen + payload.len()) as u16);
        h[2..4].copy_from_slice(&tot.to_be_bytes());
        h[4..6].copy_from_slice(&self.id.to_be_bytes());
        let frag = (self.frag_offset & 0x1fff) | if self.more_fragments { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[8] = 64;
        h[9] = self.proto;
        h[12..16].copy_from_slice(&self.src);
        h[16..20].copy_from_slice(&self.dst);
        let c = checksum(&h[..hlen.min(60)]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }
}

/// An IPv4 packet in an Ethernet frame.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    eth(ETH_P_IP, &Ipv4::new(src, dst, proto).build(payload))
}

/// An IPv6 header followed by `payload`, which starts with the header named by `next`.
pub fn ipv6_raw(src: [u8; 16], dst: [u8; 16], next: u8, hop_limit: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(40 + payload.len());
    h.extend_from_slice(&[0x60, 0, 0, 0]);
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.push(next);
    h.push(hop_limit);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(payload);
    h
}

/// An IPv6 packet in an Ethernet frame.
pub fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    eth(ETH_P_IPV6, &ipv6_raw(src, dst, next, 64, payload))
}

/// An IPv6 fragment extension header (8 bytes, identification 0xdeadbeef) in front of `payload`.
pub fn ipv6_fragment(next: u8, offset_units: u16, more: bool, payload: &[u8]) -> Vec<u8> {
    ipv6_fragment_id(next, offset_units, more, 0xdead_beef, payload)
}

/// An IPv6 fragment extension header with identification `id` in front of `payload`.
pub fn ipv6_fragment_id(
    next: u8,
    offset_units: u16,
    more: bool,
    id: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut h = vec![next, 0];
    let v = (offset_units << 3) | u16::from(more);
    h.extend_from_slice(&v.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 hop-by-hop options header with a router alert option (as MLD sends), 8 bytes.
pub fn ipv6_hop_by_hop_router_alert(next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![next, 0, 5, 2, 0, 0, 1, 0];
    h.extend_from_slice(payload);
    h
}

/// An IPv6 extension header of type `kind` (hop-by-hop 0, routing 43, destination options 60:
/// `(len + 1) * 8` bytes; authentication 51: `(len + 2) * 4` bytes), zero-filled, in front of
/// `payload`. Fragment headers: [`ipv6_fragment`].
pub fn ipv6_ext(kind: u8, next: u8, len: u8, payload: &[u8]) -> Vec<u8> {
    let size = if kind == 51 {
        (len as usize + 2) * 4
    } else {
        (len as usize + 1) * 8
    };
    let mut h = vec![0u8; size.max(2)];
    h[0] = next;
    h[1] = len;
    h.extend_from_slice(payload);
    h
}

/// A TCP header of 20 bytes.
pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&1000u32.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    h
}

/// A UDP header and payload.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

/// An ICMP or ICMPv6 message: type, code, checksum (zero), the 4 "rest of header" bytes, body.
pub fn icmp(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut h = vec![ty, code, 0, 0];
    h.extend_from_slice(&rest);
    h.extend_from_slice(body);
    h
}

/// An echo request or reply body (`ty` picks which): identifier and sequence number.
pub fn icmp_echo(ty: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut rest = [0u8; 4];
    rest[0..2].copy_from_slice(&id.to_be_bytes());
    rest[2..4].copy_from_slice(&seq.to_be_bytes());
    icmp(ty, 0, rest, b"netpol-ping-data")
}

/// The Internet checksum.
pub fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Strips the Ethernet header of a frame built here (for embedding a packet in an ICMP error).
pub fn l3(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let p = Ipv4::new([10, 0, 0, 1], [10, 0, 0, 2], 6).build(&tcp(1, 2, TCP_SYN));
        assert_eq!(checksum(&p[..20]), 0);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 40);
    }

    #[test]
    fn ipv6_payload_length_counts_extension_headers() {
        let p = ipv6_raw(
            [0; 16],
            [0; 16],
            44,
            64,
            &ipv6_fragment(17, 0, true, &udp(1, 2, b"x")),
        );
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 8 + 9);
        assert_eq!(p[6], 44);
    }
}
