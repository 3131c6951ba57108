"""Splitting datagrams into DTLS records and packing records into datagrams."""

from __future__ import annotations

from typing import Iterable

from perc.dtls.constants import RECORD_HEADER_LENGTH


def split_records(data: bytes) -> list:
    """
    Split concatenated DTLS records (13-octet header, length at offset 11)
    into a list of records.  A truncated tail is returned as a last, short
    element rather than dropped, so nothing disappears silently.
    """
    records = []
    offset = 0
    total = len(data)
    while offset < total:
        if total - offset < RECORD_HEADER_LENGTH:
            records.append(data[offset:])
            break
        length = int.from_bytes(data[offset + 11 : offset + 13], "big")
        end = offset + RECORD_HEADER_LENGTH + length
        records.append(data[offset:end])
        offset = end
    return records


def pack_records(records: Iterable[bytes], mtu: int) -> list:
    """
    Pack whole records, in order, into datagrams of at most ``mtu`` octets.
    A record larger than ``mtu`` travels alone.
    """
    datagrams = []
    current = bytearray()
    for record in records:
        if current and len(current) + len(record) > mtu:
            datagrams.append(bytes(current))
            current = bytearray()
        current += record
    if current:
        datagrams.append(bytes(current))
    return datagrams
