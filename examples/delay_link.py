#!/usr/bin/env python3
"""A network cable with a home LAN's latency, for kernels without `tc netem` (sch_netem).

examples/netns_cluster.sh wires each test host to its switch with a veth pair and delays the
host's outgoing packets with `tc qdisc ... netem delay 2ms`. Some kernels (minimal VM
kernels, Firecracker's among them) are built without sch_netem; there the script wires the
host with this program instead: two TAP devices, one inside the host (its `eth0`), one that
the script moves to the switch's namespace and plugs into the bridge, and this process
carrying every Ethernet frame between them. Frames leaving the host wait DELAY before they
reach the switch, exactly what netem on the host's eth0 does; frames towards the host pass
at once (the sender's own link delayed them). So two hosts see 2 x DELAY of round trip, as
with netem. Order is kept (one fixed delay, one queue per direction). A frame that cannot be
delivered (the switch port was set down: a pulled cable, or the queue is full) is lost, as on
a wire, and the transports above retransmit.

    python3 delay_link.py --inside eth0 --outside plk-up --delay 2ms

Runs until killed (SIGTERM/SIGINT, or the namespace's processes being ended); the TAP
devices vanish with it, which is the cable being pulled. Needs root (CAP_NET_ADMIN) and
/dev/net/tun. Standard library only.
"""

import argparse
import collections
import errno
import fcntl
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16

# A frame is at most the MTU plus the Ethernet header (no offloads are asked for, so the
# kernel segments before handing frames to a TAP); 64 KiB covers any MTU.
FRAME_BYTES_MAX = 65536
# Frames read from one side in one go before the other side gets a turn.
READ_BURST_MAX = 256
# Frames waiting in one direction; beyond this the link drops (a switch's buffer). At 1 Gbit/s
# and 2 ms about 170 full frames are in flight, so this only bites on a flood.
QUEUE_FRAMES_MAX = 8192
DELAY_S_MAX = 10.0


def parse_delay(text):
    """'2ms', '500us', '0.002s' or a bare number of milliseconds, into seconds."""
    units = (("us", 1e-6), ("ms", 1e-3), ("s", 1.0))
    for suffix, scale in units:
        if text.endswith(suffix):
            number, factor = text[: -len(suffix)], scale
            break
    else:
        number, factor = text, 1e-3
    try:
        value = float(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a delay: {text!r} (use e.g. 2ms, 500us)")
    if not 0 <= value <= DELAY_S_MAX:
        raise argparse.ArgumentTypeError(f"delay {text!r} is outside 0..{DELAY_S_MAX:g}s")
    return value


def interface_name(text):
    if not 1 <= len(text.encode()) < IFNAMSIZ or "/" in text or text.strip() != text:
        raise argparse.ArgumentTypeError(f"not an interface name: {text!r}")
    return text


def open_tap(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def forward(inside, outside, delay_s):
    # Frames read from a device, waiting to be written to the other one: (due time, frame).
    delays = {inside: delay_s, outside: 0.0}
    other = {inside: outside, outside: inside}
    queues = {inside: collections.deque(), outside: collections.deque()}
    fds = [inside, outside]
    while True:
        now = time.monotonic()
        for source, queue in queues.items():
            while queue and queue[0][0] <= now:
                write(other[source], queue.popleft()[1])
        heads = [queue[0][0] for queue in queues.values() if queue]
        timeout = max(0.0, min(heads) - now) if heads else None
        readable, _, _ = select.select(fds, [], [], timeout)
        now = time.monotonic()
        for source in readable:
            queue, delay = queues[source], delays[source]
            for _ in range(READ_BURST_MAX):
                try:
                    frame = os.read(source, FRAME_BYTES_MAX)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in (errno.EIO, errno.EBADFD):
                        break
                    raise
                if delay == 0.0 and not queue:
                    write(other[source], frame)
                elif len(queue) < QUEUE_FRAMES_MAX:
                    queue.append((now + delay, frame))


def write(fd, frame):
    try:
        os.write(fd, frame)
    except OSError:
        # The far device is down (a pulled cable) or its queue is full: the frame is lost.
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inside", type=interface_name, required=True, help="the host's interface (e.g. eth0)")
    parser.add_argument("--outside", type=interface_name, required=True, help="the switch-side interface")
    parser.add_argument("--delay", type=parse_delay, default=parse_delay("2ms"), help="delay of frames leaving the host (default 2ms)")
    args = parser.parse_args()
    if args.inside == args.outside:
        parser.error("--inside and --outside must differ")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        inside = open_tap(args.inside)
        outside = open_tap(args.outside)
    except OSError as e:
        sys.exit(f"delay_link: cannot create the TAP devices {args.inside}/{args.outside}: {e} (needs root and /dev/net/tun)")
    print(f"delay_link: {args.inside} <-> {args.outside}, {args.delay * 1e3:g} ms on frames leaving {args.inside}", flush=True)
    try:
        forward(inside, outside, args.delay)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
