"""
Codec benchmark: tunnel messages (``perc.wire``) encoded and decoded per
second, for each of the five message types, against a baseline of plain
``struct.pack`` / ``struct.unpack`` of the same fields in the same run.

One operation = ``message.encode()`` then ``wire.decode_message()`` of the
result (header, every field, strict validation, a message object back).
The baseline operation packs the same field values with one precompiled
``struct.Struct`` (the association id as its 16 octets, variable-length
fields with their length octets, a TunneledDtls payload appended) and
unpacks them again into a tuple: no objects, no validation.  Messages:

=====================  ===============================================
SupportedProfiles      version 0, profiles (0x0009, 0x000A)
UnsupportedVersion     highest_version 0
MediaKeys              profile 0x0009, no MKI, 16-octet keys, 12-octet
                       salts (the hop-by-hop keys of a double profile)
TunneledDtls           ``--dtls-size`` octets of DTLS (default 200)
EndpointDisconnect     an association id
=====================  ===============================================

Each figure is the best of ``--repeat`` timed runs of about ``--seconds``
each, codec and baseline interleaved.  ``ratio`` = ops_per_s /
baseline_ops_per_s (1.0 would be as fast as bare struct).

    python bench/codec.py [--seconds 0.2] [--repeat 5] [--dtls-size 200]
    perc bench codec

The last line printed is one JSON object with the figures.  Exit status 1
(with a line starting ``FAILED``) if a message does not survive the round
trip or the baseline does not reproduce its fields.
"""

from __future__ import annotations

import argparse
import gc
import os
import struct
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


class BenchFailure(Exception):
    pass


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="perc bench codec",
        description="Tunnel messages encoded+decoded per second (perc.wire) against "
                    "struct.pack/unpack of the same fields.")
    parser.add_argument("--seconds", type=float, default=0.2,
                        help="length of one timed run in seconds (default 0.2)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed runs per figure; the best is kept (default 5)")
    parser.add_argument("--dtls-size", type=int, default=200,
                        help="octets of DTLS in the TunneledDtls message (default 200)")
    args = parser.parse_args(argv)
    if not 0.01 <= args.seconds <= 5:
        parser.error("--seconds must be 0.01 to 5")
    if not 1 <= args.repeat <= 50:
        parser.error("--repeat must be 1 to 50")
    if not 1 <= args.dtls_size <= 65517:
        parser.error("--dtls-size must be 1 to 65517")
    return args


def cases(dtls_size):
    """``[(name, codec_op, baseline_op, check)]``: each op does one encode+decode."""
    from perc import wire

    aid = uuid.UUID(bytes=os.urandom(16))
    aid_bytes = aid.bytes
    dtls = bytes([22, 0xFE, 0xFD]) + os.urandom(dtls_size - 3) if dtls_size >= 3 \
        else os.urandom(dtls_size)
    keys = (os.urandom(16), os.urandom(16), os.urandom(12), os.urandom(12))
    decode_message = wire.decode_message
    result = []

    def add(name, message, baseline_struct, baseline_fields, tail=b""):
        encode = message.encode
        pack, unpack_from = baseline_struct.pack, baseline_struct.unpack_from
        size = baseline_struct.size

        def codec_op():
            return decode_message(encode())

        if tail:
            def baseline_op():
                data = pack(*baseline_fields) + tail
                return unpack_from(data), data[size:]
        else:
            def baseline_op():
                return unpack_from(pack(*baseline_fields))

        def check():
            encoded = encode()
            if decode_message(encoded) != message:
                raise BenchFailure("{} did not survive encode+decode".format(name))
            if tail:
                fields, rest = baseline_op()
                if rest != tail:
                    raise BenchFailure("baseline {} lost its payload".format(name))
            else:
                fields = baseline_op()
            if tuple(fields) != tuple(baseline_fields):
                raise BenchFailure("baseline {} did not reproduce its fields".format(name))
            if pack(*baseline_fields) + tail != encoded:
                raise BenchFailure("baseline {} does not produce the same octets".format(name))

        result.append((name, codec_op, baseline_op, check))

    add("SupportedProfiles", wire.SupportedProfiles(0, (0x0009, 0x000A)),
        struct.Struct("!BHBH2H"), (1, 7, 0, 4, 0x0009, 0x000A))
    add("UnsupportedVersion", wire.UnsupportedVersion(0), struct.Struct("!BHB"), (2, 1, 0))
    mk_body = 16 + 2 + 1 + sum(1 + len(k) for k in keys)
    add("MediaKeys", wire.MediaKeys(aid, 0x0009, b"", *keys),
        struct.Struct("!BH16sHB0sB16sB16sB12sB12s"),
        (3, mk_body, aid_bytes, 0x0009, 0, b"", 16, keys[0], 16, keys[1], 12, keys[2],
         12, keys[3]))
    add("TunneledDtls", wire.TunneledDtls(aid, dtls), struct.Struct("!BH16sH"),
        (4, 18 + len(dtls), aid_bytes, len(dtls)), tail=dtls)
    add("EndpointDisconnect", wire.EndpointDisconnect(aid), struct.Struct("!BH16s"),
        (5, 16, aid_bytes))
    return result


def ops_per_second(op, seconds):
    """Operations per second of ``op`` over about ``seconds`` (batches of calls)."""
    clock = time.perf_counter
    batch = 64
    # Size the batch so that one batch takes ~1/50 of the run.
    while True:
        start = clock()
        for _ in range(batch):
            op()
        took = clock() - start
        if took >= seconds / 50 or batch >= 1 << 20:
            break
        batch *= 2
    done = 0
    start = clock()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            op()
        done += batch
        now = clock()
        if now >= deadline:
            return done / (now - start)


def run(args):
    rows = []
    figures = {}
    gc_was_enabled = gc.isenabled()
    for name, codec_op, baseline_op, check in cases(args.dtls_size):
        check()
        best_codec = best_baseline = 0.0
        gc.disable()
        try:
            for _ in range(args.repeat):
                best_codec = max(best_codec, ops_per_second(codec_op, args.seconds))
                best_baseline = max(best_baseline, ops_per_second(baseline_op, args.seconds))
        finally:
            if gc_was_enabled:
                gc.enable()
        ratio = best_codec / best_baseline
        figures[name] = {"ops_per_s": round(best_codec), "baseline_ops_per_s": round(best_baseline),
                         "ratio": round(ratio, 4)}
        rows.append([name, "{:,.0f}".format(best_codec), "{:,.0f}".format(best_baseline),
                     "{:.3f}".format(ratio), "{:.2f}".format(1e6 / best_codec),
                     "{:.2f}".format(1e6 / best_baseline)])
    print(_common.format_table(
        ["message (encode+decode)", "ops/s", "struct ops/s", "ratio", "us/op", "struct us/op"],
        rows))
    return figures


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        types = run(args)
    except BenchFailure as error:
        print("FAILED: {}".format(error))
        _common.print_json_last({"benchmark": "codec", "ok": False, "error": str(error)})
        return 1
    _common.print_json_last({"benchmark": "codec", "ok": True, "dtls_size": args.dtls_size,
                             "seconds": args.seconds, "repeat": args.repeat, "types": types})
    return 0


if __name__ == "__main__":
    sys.exit(main())
