// SPDX-License-Identifier: MIT OR GPL-2.0
//
// The forwarding benchmark's sink (benches/fwd.sh, `espgw-xdpgen sink`): attached to the far
// end of the gateway's output veth, it counts and drops every IPv4 frame before the receiving
// namespace's IP stack sees it. Anything else (ARP) goes on to the kernel, so neighbour
// resolution keeps working. Two entry points, one counter map:
//   tc_sink  (SEC "classifier", attached as a TCX ingress program): the default. The frame stays the
//            skb the sender built;
//   xdp_sink (SEC "xdp", native XDP): on veth, native XDP first copies every skb that arrives
//            from a sender without XDP headroom (as AF_XDP copy mode builds them) into a page of
//            its own, which costs the sending CPU a second copy of the frame.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// Classes; `counters` holds packets at 2 * class and bytes at 2 * class + 1.
enum class {
	K_ESP = 0,     // IPv4 protocol 50
	K_ESP_IN_UDP,  // IPv4 UDP to port 4500
	K_UDP,         // other IPv4 UDP
	K_OTHER_IPV4,  // any other IPv4 frame
	K_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * K_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void account(__u32 class, __u64 bytes)
{
	__u32 k = 2 * class;
	__u64 *v = bpf_map_lookup_elem(&counters, &k);
	if (v)
		*v += 1;
	k += 1;
	v = bpf_map_lookup_elem(&counters, &k);
	if (v)
		*v += bytes;
}

// The class of an Ethernet frame, or -1 if it is not IPv4 (it goes to the kernel).
static __always_inline int classify(void *data, void *data_end)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return K_OTHER_IPV4;
	if (ip->protocol == IPPROTO_ESP)
		return K_ESP;
	if (ip->protocol != IPPROTO_UDP || ip->ihl != 5)
		return K_OTHER_IPV4;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > data_end)
		return K_OTHER_IPV4;
	if (udp->dest == bpf_htons(4500))
		return K_ESP_IN_UDP;
	return K_UDP;
}

SEC("xdp")
int xdp_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	int class = classify(data, data_end);

	if (class < 0)
		return XDP_PASS;
	account(class, data_end - data);
	return XDP_DROP;
}

SEC("classifier")
int tc_sink(struct __sk_buff *skb)
{
	// At tc ingress the packet starts at the Ethernet header.
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	int class = classify(data, data_end);

	if (class < 0)
		return TC_ACT_OK;
	account(class, skb->len);
	return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
