#!/usr/bin/env python3
"""Writes an F32 copy of a GGUF model: every Q4_0/Q4_1/Q8_0/F16 tensor is
dequantized to fp32, metadata copied byte for byte. bench_engine uses it to
time the fp32 GEMM on a real model's shapes (no F32 SmolLM2 file is shipped).

    python3 bench/gguf_to_f32.py models/SmolLM2-135M-Instruct.Q4_1.gguf \
        models/SmolLM2-135M-Instruct.F32.gguf

numpy only: the GGUF layout is read here directly.
"""
import struct
import sys

import numpy as np

F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8
# Sizes of fixed-width metadata value types, by GGUF type id.
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self):
        n = self.take("Q")
        s = self.data[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def skip_value(self, type_id):
        if type_id == 8:
            self.string()
        elif type_id == 9:
            element, count = self.take("I"), self.take("Q")
            for _ in range(count):
                self.skip_value(element)
        else:
            self.pos += SCALAR_BYTES[type_id]


def dequantize(raw, type_id, count):
    if type_id == F32:
        return np.frombuffer(raw, dtype="<f4", count=count).copy()
    if type_id == F16:
        return np.frombuffer(raw, dtype="<f2", count=count).astype(np.float32)
    if type_id == Q8_0:
        blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 34)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        return (d * q).reshape(-1)[:count]
    if type_id in (Q4_0, Q4_1):
        size = 18 if type_id == Q4_0 else 20
        blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, size)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)
        packed = blocks[:, size - 16:]
        q = np.concatenate([packed & 15, packed >> 4], axis=1).astype(np.float32)
        if type_id == Q4_0:
            values = d * (q - 8)
        else:
            m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
            values = d * q + m
        return values.reshape(-1)[:count]
    raise SystemExit(f"tensor type {type_id} is not handled by this converter")


BLOCK = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34)}


def main(src, dst):
    data = open(src, "rb").read()
    r = Reader(data)
    magic, version, n_tensors, n_kv = r.take("4s"), r.take("I"), r.take("Q"), r.take("Q")
    assert magic == b"GGUF", "not a GGUF file"
    kv_start, alignment = r.pos, 32
    for _ in range(n_kv):
        key, type_id = r.string(), r.take("I")
        if key == "general.alignment":
            alignment = r.take("I")
        else:
            r.skip_value(type_id)
    kv_bytes = data[kv_start:r.pos]
    tensors = []
    for _ in range(n_tensors):
        name, n_dims = r.string(), r.take("I")
        dims = [r.take("Q") for _ in range(n_dims)]
        type_id, offset = r.take("I"), r.take("Q")
        tensors.append((name, dims, type_id, offset))
    data_start = (r.pos + alignment - 1) // alignment * alignment

    infos, payloads, offset = bytearray(), [], 0
    for name, dims, type_id, source_offset in tensors:
        count = int(np.prod(dims))
        elems, nbytes = BLOCK[type_id]
        raw = data[data_start + source_offset:data_start + source_offset + count // elems * nbytes]
        values = dequantize(raw, type_id, count).astype("<f4").tobytes()
        encoded = name.encode("utf-8")
        infos += struct.pack("<Q", len(encoded)) + encoded + struct.pack("<I", len(dims))
        infos += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", F32, offset)
        payloads.append((offset, values))
        offset = (offset + len(values) + alignment - 1) // alignment * alignment

    header = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kv_bytes + bytes(infos)
    with open(dst, "wb") as out:
        out.write(header)
        out.write(b"\0" * ((-len(header)) % alignment))
        base = out.tell()
        for at, values in payloads:
            out.write(b"\0" * (base + at - out.tell()))
            out.write(values)
    print(f"{dst}: {n_tensors} tensors as F32")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: gguf_to_f32.py in.gguf out.gguf")
    main(sys.argv[1], sys.argv[2])
