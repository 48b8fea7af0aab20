//! A small synchronous rtnetlink client: one `NETLINK_ROUTE` socket, bound
//! to the network namespace of the thread that opened it, and builders for
//! the few messages this crate sends.
//!
//! Requests can be pipelined: [`Netlink::batch`] writes several messages in
//! one `send` and then reads their acknowledgements in order, which keeps a
//! namespace's whole set-up to a handful of system calls.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Create a new object, failing if it exists.
pub(crate) const CREATE_EXCL: u16 = NLM_F_CREATE | NLM_F_EXCL;
/// Create a new object or update the one there: idempotent.
pub(crate) const CREATE_REPLACE: u16 = NLM_F_CREATE | NLM_F_REPLACE;

/// One request of a batch: the message, its extra flags, and what it does
/// (for error messages).
pub(crate) struct Request {
    pub msg: RouteNetlinkMessage,
    pub flags: u16,
    pub what: String,
}

impl Request {
    pub fn new(msg: RouteNetlinkMessage, flags: u16, what: impl Into<String>) -> Self {
        Request {
            msg,
            flags,
            what: what.into(),
        }
    }
}

/// A `NETLINK_ROUTE` socket in the namespace of the thread that opened it.
pub(crate) struct Netlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// A request that failed: which one, and the kernel's answer.
#[derive(Debug)]
pub(crate) struct Failed {
    pub what: String,
    pub source: io::Error,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink {
            sock,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    fn encode(&mut self, out: &mut Vec<u8>, msg: RouteNetlinkMessage, flags: u16) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let start = out.len();
        out.resize(start + packet.buffer_len(), 0);
        packet.serialize(&mut out[start..]);
        self.seq
    }

    /// Sends every request in one datagram and waits for each one's
    /// acknowledgement; the first failure is returned (the kernel still
    /// carries out the requests after a failed one, but nothing here relies
    /// on them).
    pub fn batch(&mut self, requests: Vec<Request>) -> Result<(), Failed> {
        let mut out = Vec::with_capacity(256 * requests.len());
        let mut pending = Vec::with_capacity(requests.len());
        for r in requests {
            let seq = self.encode(&mut out, r.msg, r.flags | NLM_F_ACK);
            pending.push((seq, r.what));
        }
        let first = pending.first().map(|(_, w)| w.clone()).unwrap_or_default();
        self.sock.send(&out, 0).map_err(|source| Failed {
            what: first.clone(),
            source,
        })?;
        let mut error: Option<Failed> = None;
        let mut acked = 0;
        while acked < pending.len() {
            let messages = self.receive().map_err(|source| Failed {
                what: first.clone(),
                source,
            })?;
            for m in messages {
                if let NetlinkPayload::Error(e) = m.payload {
                    let seq = m.header.sequence_number;
                    let Some(i) = pending.iter().position(|(s, _)| *s == seq) else {
                        continue;
                    };
                    acked += 1;
                    if e.code.is_some() && error.is_none() {
                        error = Some(Failed {
                            what: pending[i].1.clone(),
                            source: e.to_io(),
                        });
                    }
                }
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// One request, acknowledged.
    pub fn request(&mut self, r: Request) -> Result<(), Failed> {
        self.batch(vec![r])
    }

    /// A request answered by one message (a `GET` without `NLM_F_DUMP`).
    pub fn get(&mut self, msg: RouteNetlinkMessage) -> io::Result<RouteNetlinkMessage> {
        let mut out = Vec::new();
        let seq = self.encode(&mut out, msg, 0);
        self.sock.send(&out, 0)?;
        loop {
            for m in self.receive()? {
                if m.header.sequence_number != seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::InnerMessage(inner) => return Ok(inner),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    _ => {}
                }
            }
        }
    }

    /// A dump: every message until `NLMSG_DONE`.
    pub fn dump(&mut self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut out = Vec::new();
        let seq = self.encode(&mut out, msg, NLM_F_DUMP);
        self.sock.send(&out, 0)?;
        let mut all = Vec::new();
        loop {
            for m in self.receive()? {
                if m.header.sequence_number != seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::InnerMessage(inner) => all.push(inner),
                    NetlinkPayload::Done(_) => return Ok(all),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    _ => {}
                }
            }
        }
    }

    /// Reads one datagram and splits it into its messages.
    fn receive(&mut self) -> io::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
        let n = loop {
            match self.sock.recv(&mut &mut self.buf[..], 0) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        let n = n.min(self.buf.len());
        let mut messages = Vec::new();
        let mut at = 0;
        while at + 16 <= n {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[at..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = m.header.length as usize;
            messages.push(m);
            if len == 0 {
                break;
            }
            at += (len + 3) & !3;
        }
        Ok(messages)
    }

    /// The index of the link named `name`, `None` when there is none.
    pub fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
        Ok(self.link(name)?.map(|l| l.header.index))
    }

    /// The link named `name`, `None` when there is none.
    pub fn link(&mut self, name: &str) -> io::Result<Option<LinkMessage>> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.get(RouteNetlinkMessage::GetLink(m)) {
            Ok(RouteNetlinkMessage::NewLink(l)) => Ok(Some(l)),
            Ok(_) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc_enodev()) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> io::Result<Vec<LinkMessage>> {
        let all = self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
        Ok(all
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }
}

impl Netlink {
    /// The addresses on the link at `index`, with their prefix lengths.
    pub fn addresses(&mut self, index: u32) -> io::Result<Vec<(IpAddr, u8)>> {
        let all = self.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
        Ok(all
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    let ip = a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    let ip = ip.or_else(|| {
                        a.attributes.iter().find_map(|at| match at {
                            AddressAttribute::Address(ip) => Some(*ip),
                            _ => None,
                        })
                    })?;
                    Some((ip, a.header.prefix_len))
                }
                _ => None,
            })
            .collect())
    }
}

/// `ENODEV`: no such device.
pub(crate) fn libc_enodev() -> i32 {
    rustix::io::Errno::NODEV.raw_os_error()
}

/// The name of a link message, if it has one.
pub(crate) fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// Whether a link message describes a veth.
pub(crate) fn is_veth(l: &LinkMessage) -> bool {
    l.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
        _ => false,
    })
}

/// A veth pair: `name` in the socket's namespace (at index `index`, or any
/// when 0) and `peer` in the namespace of `peer_ns`. Both are created down:
/// the kernel cannot open an end before the pair is joined (`ENOTCONN`).
pub(crate) fn new_veth(
    name: &str,
    index: u32,
    peer: &str,
    peer_ns: BorrowedFd<'_>,
) -> RouteNetlinkMessage {
    let mut p = LinkMessage::default();
    p.attributes.push(LinkAttribute::IfName(peer.to_owned()));
    p.attributes
        .push(LinkAttribute::NetNsFd(peer_ns.as_raw_fd()));
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.attributes.push(LinkAttribute::IfName(name.to_owned()));
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
    ]));
    RouteNetlinkMessage::NewLink(m)
}

/// A veth pair with both ends in the socket's namespace (the host check).
pub(crate) fn new_local_veth(name: &str, peer: &str) -> RouteNetlinkMessage {
    let mut p = LinkMessage::default();
    p.attributes.push(LinkAttribute::IfName(peer.to_owned()));
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_owned()));
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
    ]));
    RouteNetlinkMessage::NewLink(m)
}

/// Brings the link at `index` up.
pub(crate) fn set_up(index: u32) -> RouteNetlinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    RouteNetlinkMessage::SetLink(m)
}

/// Deletes the link named `name`.
pub(crate) fn del_link(name: &str) -> RouteNetlinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_owned()));
    RouteNetlinkMessage::DelLink(m)
}

/// `ip/prefix` on the link at `index`, usable at once (no duplicate address
/// detection for IPv6).
pub(crate) fn new_addr(index: u32, ip: IpAddr, prefix: u8) -> RouteNetlinkMessage {
    RouteNetlinkMessage::NewAddress(addr_msg(index, ip, prefix))
}

fn addr_msg(index: u32, ip: IpAddr, prefix: u8) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.index = index;
    m.header.prefix_len = prefix;
    match ip {
        IpAddr::V4(_) => {
            m.header.family = AddressFamily::Inet;
            m.header.scope = AddressScope::Universe;
        }
        IpAddr::V6(v6) => {
            m.header.family = AddressFamily::Inet6;
            m.header.scope = if v6.is_unicast_link_local() {
                AddressScope::Link
            } else {
                AddressScope::Universe
            };
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
    }
    m.attributes.push(AddressAttribute::Local(ip));
    m.attributes.push(AddressAttribute::Address(ip));
    m
}

/// Removes `ip/prefix` from the link at `index`.
pub(crate) fn del_addr(index: u32, ip: IpAddr, prefix: u8) -> RouteNetlinkMessage {
    RouteNetlinkMessage::DelAddress(addr_msg(index, ip, prefix))
}

fn route(dst: IpAddr, prefix: u8, oif: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = match dst {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    m.header.destination_prefix_length = prefix;
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Static;
    m.header.kind = RouteType::Unicast;
    if prefix > 0 {
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    }
    m.attributes.push(RouteAttribute::Oif(oif));
    m
}

/// `dst/prefix dev oif` (scope link: the destination is on that link).
pub(crate) fn new_dev_route(dst: IpAddr, prefix: u8, oif: u32) -> RouteNetlinkMessage {
    let mut m = route(dst, prefix, oif);
    m.header.scope = RouteScope::Link;
    RouteNetlinkMessage::NewRoute(m)
}

/// Deletes the route `dst/prefix` only if it goes through `oif` (the
/// kernel matches the output interface: `ESRCH` when the route goes
/// elsewhere or is gone).
pub(crate) fn del_dev_route(dst: IpAddr, prefix: u8, oif: u32) -> RouteNetlinkMessage {
    let mut m = route(dst, prefix, oif);
    m.header.scope = RouteScope::Link;
    RouteNetlinkMessage::DelRoute(m)
}

/// `default via gw dev oif` for IPv6 (a link-local gateway).
pub(crate) fn new_default6(gw: Ipv6Addr, oif: u32) -> RouteNetlinkMessage {
    let mut m = route(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0, oif);
    m.header.scope = RouteScope::Universe;
    m.attributes
        .push(RouteAttribute::Gateway(RouteAddress::Inet6(gw)));
    RouteNetlinkMessage::NewRoute(m)
}

/// `default via gw dev oif onlink` for IPv4: the gateway needs no route of
/// its own.
pub(crate) fn new_default4(gw: Ipv4Addr, oif: u32) -> RouteNetlinkMessage {
    let mut m = route(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, oif);
    m.header.scope = RouteScope::Universe;
    m.header.flags = RouteFlags::Onlink;
    m.attributes
        .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
    RouteNetlinkMessage::NewRoute(m)
}
