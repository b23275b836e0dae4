// SPDX-License-Identifier: MIT OR GPL-2.0
//
// espgw XDP steering program: decides, per received frame, whether it goes to the data plane's
// AF_XDP socket of the receiving queue, to the kernel, or (NAT keepalives only) nowhere.
// See ebpf/README.md for the verdicts, the maps and how user space configures them.
//
// Nothing is ever dropped because it cannot be parsed: whatever this program does not
// understand goes to the kernel, which decides.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// ---- configuration (written by user space, dataplane/src/xdp.rs) ----

#define ROLE_UNCONFIGURED 0
#define ROLE_WAN 1
#define ROLE_LAN 2

// Value of the single entry of `config`. Native byte order (user space writes it on this host).
struct steer_config {
	__u32 role;       // ROLE_*
	__u16 encap_port; // UDP encapsulation port (RFC 3948), host byte order; normally 4500
	__u16 reserved;
};

// Key of `local_addrs`: the 16 address bytes in network order; IPv4 as v4-mapped ::ffff:a.b.c.d.
struct local_addr {
	__u8 addr[16];
};

// ---- verdict counters: the index is the position in COUNTER_NAMES in xdp.rs ----

enum counter {
	C_ESP = 0,         // ESP (IP protocol 50) to a local address -> socket
	C_ESP_FRAGMENT,    // outer fragment of ESP to a local address -> socket
	C_ESP_IN_UDP,      // ESP in UDP to the encapsulation port of a local address -> socket
	C_ROUTED,          // LAN: unicast to a non-local destination -> socket
	C_NO_SOCKET,       // would go to the socket, but none is registered for the queue -> kernel
	C_IKE,             // UDP 500, or the encapsulation port with the non-ESP marker -> kernel
	C_NAT_KEEPALIVE,   // one byte 0xFF on the encapsulation port (RFC 3948 2.3) -> dropped
	C_UDP_FRAGMENT,    // WAN: fragment of a UDP datagram (may be a large IKE message) -> kernel
	C_ENCAP_OTHER,     // encapsulation port, payload neither marker, keepalive nor ESP -> kernel
	C_NOT_LOCAL,       // WAN: ESP / encapsulation port to an address that is not ours -> kernel
	C_LOCAL,           // LAN: IP addressed to the gateway itself -> kernel
	C_TO_KERNEL,       // everything else (ARP, ND, ICMP, multicast, management ...) -> kernel
	C_MALFORMED,       // truncated or invalid headers -> kernel
	C_UNCONFIGURED,    // the config map was never written -> kernel
	C_MAX,
};

// ---- maps (one set per loaded instance, i.e. per port) ----

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct steer_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct local_addr);
	__type(value, __u8);
} local_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, C_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

// ---- protocol constants not always in the UAPI headers ----

#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8
#define IP_MF_ 0x2000
#define IP_OFFSET_ 0x1FFF
#define IKE_PORT 500
#define IPV6_MAX_EXT_HEADERS 8

struct vlan_tag {
	__be16 tci;
	__be16 inner_proto;
};

struct ipv6_ext {
	__u8 nexthdr;
	__u8 hdrlen; // in 8-byte units, not counting the first 8 bytes
};

struct ipv6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

static __always_inline void count(__u32 idx)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &idx);
	if (value)
		*value += 1;
}

static __always_inline int verdict(__u32 idx, int action)
{
	count(idx);
	return action;
}

// Redirect to the AF_XDP socket of the receiving queue, or to the kernel if there is none.
static __always_inline int to_socket(struct xdp_md *ctx, __u32 idx)
{
	__u32 queue = ctx->rx_queue_index;

	if (!bpf_map_lookup_elem(&xsks, &queue))
		return verdict(C_NO_SOCKET, XDP_PASS);
	long action = bpf_redirect_map(&xsks, queue, XDP_PASS);
	if (action != XDP_REDIRECT)
		return verdict(C_NO_SOCKET, (int)action);
	return verdict(idx, XDP_REDIRECT);
}

static __always_inline int is_local(const struct local_addr *key)
{
	return bpf_map_lookup_elem(&local_addrs, key) != 0;
}

// What the network and transport layers told us about a frame.
struct l3_info {
	struct local_addr dst; // destination, v4-mapped for IPv4
	void *l4;              // start of the transport header (valid when !fragment)
	__u8 proto;            // transport protocol (for IPv6: after the extension headers)
	__u8 fragment;         // an outer fragment (first or not)
	__u8 ipv4;
};

enum parse_result {
	PARSE_OK = 0,
	PARSE_MALFORMED,
	PARSE_NOT_IP,
	PARSE_TOO_MANY_EXT, // more IPv6 extension headers than we walk
};

static __always_inline int parse_ipv4(void *l3, void *data_end, struct l3_info *info)
{
	struct iphdr *ip = l3;

	if ((void *)(ip + 1) > data_end)
		return PARSE_MALFORMED;
	if (ip->version != 4 || ip->ihl < 5)
		return PARSE_MALFORMED;
	__u32 hdr_len = ip->ihl * 4;
	if (bpf_ntohs(ip->tot_len) < hdr_len)
		return PARSE_MALFORMED;
	if (l3 + hdr_len > data_end)
		return PARSE_MALFORMED;

	__builtin_memset(&info->dst, 0, sizeof(info->dst));
	info->dst.addr[10] = 0xff;
	info->dst.addr[11] = 0xff;
	__builtin_memcpy(&info->dst.addr[12], &ip->daddr, 4);
	info->proto = ip->protocol;
	info->fragment = (ip->frag_off & bpf_htons(IP_MF_ | IP_OFFSET_)) != 0;
	info->ipv4 = 1;
	info->l4 = l3 + hdr_len;
	return PARSE_OK;
}

static __always_inline int parse_ipv6(void *l3, void *data_end, struct l3_info *info)
{
	struct ipv6hdr *ip6 = l3;

	if ((void *)(ip6 + 1) > data_end)
		return PARSE_MALFORMED;
	if (ip6->version != 6)
		return PARSE_MALFORMED;

	__builtin_memcpy(&info->dst.addr, &ip6->daddr, 16);
	info->ipv4 = 0;
	info->fragment = 0;

	__u8 nexthdr = ip6->nexthdr;
	void *cur = (void *)(ip6 + 1);

#pragma unroll
	for (int i = 0; i < IPV6_MAX_EXT_HEADERS; i++) {
		if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
		    nexthdr == IPPROTO_DSTOPTS) {
			struct ipv6_ext *ext = cur;
			if ((void *)(ext + 1) > data_end)
				return PARSE_MALFORMED;
			nexthdr = ext->nexthdr;
			cur += ((__u32)ext->hdrlen + 1) * 8;
			if (cur > data_end)
				return PARSE_MALFORMED;
		} else if (nexthdr == IPPROTO_FRAGMENT) {
			struct ipv6_frag *frag = cur;
			if ((void *)(frag + 1) > data_end)
				return PARSE_MALFORMED;
			// The fragment's next header names the first header of the fragmentable
			// part, in every fragment; nothing behind it is looked at.
			info->proto = frag->nexthdr;
			info->fragment = 1;
			info->l4 = (void *)(frag + 1);
			return PARSE_OK;
		} else {
			info->proto = nexthdr;
			info->l4 = cur;
			return PARSE_OK;
		}
	}
	if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING || nexthdr == IPPROTO_DSTOPTS ||
	    nexthdr == IPPROTO_FRAGMENT)
		return PARSE_TOO_MANY_EXT;
	info->proto = nexthdr;
	info->l4 = cur;
	return PARSE_OK;
}

// Ethernet, one optional 802.1Q/802.1ad tag, IPv4 or IPv6.
static __always_inline int parse_frame(void *data, void *data_end, struct l3_info *info,
				       __u8 *eth_dst0)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return PARSE_MALFORMED;
	*eth_dst0 = eth->h_dest[0];

	__be16 proto = eth->h_proto;
	void *l3 = (void *)(eth + 1);
	if (proto == bpf_htons(ETH_P_8021Q_) || proto == bpf_htons(ETH_P_8021AD_)) {
		struct vlan_tag *tag = l3;
		if ((void *)(tag + 1) > data_end)
			return PARSE_MALFORMED;
		proto = tag->inner_proto;
		l3 = (void *)(tag + 1);
	}

	if (proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(l3, data_end, info);
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(l3, data_end, info);
	return PARSE_NOT_IP;
}

static __always_inline int wan(struct xdp_md *ctx, const struct l3_info *info, __u16 encap_port)
{
	void *data_end = (void *)(long)ctx->data_end;

	if (info->proto == IPPROTO_ESP) {
		if (!is_local(&info->dst))
			return verdict(C_NOT_LOCAL, XDP_PASS);
		return to_socket(ctx, info->fragment ? C_ESP_FRAGMENT : C_ESP);
	}
	if (info->proto != IPPROTO_UDP)
		return verdict(C_TO_KERNEL, XDP_PASS);

	// UDP. A fragment has no (or not the whole) datagram: the kernel reassembles, and a
	// first fragment is most likely a large IKE message.
	if (info->fragment)
		return verdict(C_UDP_FRAGMENT, XDP_PASS);

	struct udphdr *udp = info->l4;
	if ((void *)(udp + 1) > data_end)
		return verdict(C_MALFORMED, XDP_PASS);
	__u16 dport = bpf_ntohs(udp->dest);
	if (dport == IKE_PORT)
		return verdict(C_IKE, XDP_PASS);
	if (dport != encap_port)
		return verdict(C_TO_KERNEL, XDP_PASS);
	if (!is_local(&info->dst))
		return verdict(C_NOT_LOCAL, XDP_PASS);

	// The UDP length, not the frame length: a NIC may pad short frames to 60 bytes.
	__u16 udp_len = bpf_ntohs(udp->len);
	if (udp_len < sizeof(*udp))
		return verdict(C_MALFORMED, XDP_PASS);
	__u16 payload_len = udp_len - sizeof(*udp);
	__u8 *payload = (__u8 *)(udp + 1);

	if (payload_len >= 4) {
		if ((void *)(payload + 4) > data_end)
			return verdict(C_MALFORMED, XDP_PASS);
		if (payload[0] == 0 && payload[1] == 0 && payload[2] == 0 && payload[3] == 0)
			return verdict(C_IKE, XDP_PASS); // non-ESP marker
		if (payload_len < 8)
			return verdict(C_ENCAP_OTHER, XDP_PASS);
		if ((void *)(payload + 8) > data_end)
			return verdict(C_MALFORMED, XDP_PASS);
		return to_socket(ctx, C_ESP_IN_UDP); // SPI (non-zero) + sequence number
	}
	if (payload_len == 1) {
		if ((void *)(payload + 1) > data_end)
			return verdict(C_MALFORMED, XDP_PASS);
		if (payload[0] == 0xff)
			return verdict(C_NAT_KEEPALIVE, XDP_DROP);
	}
	return verdict(C_ENCAP_OTHER, XDP_PASS);
}

// Destinations that are never routed to the data plane: unspecified, loopback, link-local,
// multicast and broadcast.
static __always_inline int is_special(const struct l3_info *info)
{
	const __u8 *a = info->dst.addr;

	if (info->ipv4) {
		__u8 first = a[12];
		return first == 0 || first == 127 || first >= 224 || (first == 169 && a[13] == 254);
	}
	if (a[0] == 0xff)
		return 1; // ff00::/8 multicast
	if (a[0] == 0xfe && (a[1] & 0xc0) == 0x80)
		return 1; // fe80::/10 link-local
	__u8 high = 0;
#pragma unroll
	for (int i = 0; i < 15; i++)
		high |= a[i];
	return high == 0 && (a[15] == 0 || a[15] == 1); // :: and ::1
}

static __always_inline int lan(struct xdp_md *ctx, const struct l3_info *info, __u8 eth_dst0)
{
	// Group bit of the destination MAC: broadcast and multicast frames.
	if (eth_dst0 & 1)
		return verdict(C_TO_KERNEL, XDP_PASS);
	if (is_special(info))
		return verdict(C_TO_KERNEL, XDP_PASS);
	if (is_local(&info->dst))
		return verdict(C_LOCAL, XDP_PASS);
	return to_socket(ctx, C_ROUTED);
}

SEC("xdp")
int xdp_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;

	struct steer_config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || (cfg->role != ROLE_WAN && cfg->role != ROLE_LAN))
		return verdict(C_UNCONFIGURED, XDP_PASS);
	__u32 role = cfg->role;
	__u16 encap_port = cfg->encap_port;

	struct l3_info info = {};
	__u8 eth_dst0 = 0;
	int parsed = parse_frame(data, data_end, &info, &eth_dst0);
	if (parsed == PARSE_MALFORMED)
		return verdict(C_MALFORMED, XDP_PASS);
	if (parsed != PARSE_OK)
		return verdict(C_TO_KERNEL, XDP_PASS);

	if (role == ROLE_WAN)
		return wan(ctx, &info, encap_port);
	return lan(ctx, &info, eth_dst0);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
