"""The hand-written TFRecord framing and tf.train.Example encoding, against independent
implementations: the protobuf library (with tf.train.Example's schema built here) and
tensorboardX's pure-Python masked CRC."""

from __future__ import annotations

import struct

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from tensorboardX.record_writer import masked_crc32c

from largebatch.config import UsageError
from largebatch.data import tfrecord


def example_class():
    """tf.train.Example from its .proto definition (tensorflow/core/example/*.proto)."""
    f = descriptor_pb2.FileDescriptorProto(name="example_test.proto", package="tftest", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto

    def message(name, *fields):
        m = f.message_type.add(name=name)
        for number, field_name, kind, label, type_name, packed in fields:
            fd = m.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                fd.type_name = type_name
            if packed:
                fd.options.packed = True
        return m

    rep, opt = T.LABEL_REPEATED, T.LABEL_OPTIONAL
    message("BytesList", (1, "value", T.TYPE_BYTES, rep, None, False))
    message("Int64List", (1, "value", T.TYPE_INT64, rep, None, True))
    feature = message(
        "Feature",
        (1, "bytes_list", T.TYPE_MESSAGE, opt, ".tftest.BytesList", False),
        (3, "int64_list", T.TYPE_MESSAGE, opt, ".tftest.Int64List", False),
    )
    feature.oneof_decl.add(name="kind")
    for fd in feature.field:
        fd.oneof_index = 0
    features = message("Features", (1, "feature", T.TYPE_MESSAGE, rep, ".tftest.Features.FeatureEntry", False))
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=T.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=T.TYPE_MESSAGE, label=opt, type_name=".tftest.Feature")
    message("Example", (1, "features", T.TYPE_MESSAGE, opt, ".tftest.Features", False))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tftest.Example"))


VALUES = {
    "image/encoded": bytes(range(256)) * 700,
    "image/class/label": 1000,
    "image/filename": b"n01/x.JPEG",
    "negative": -3,
    "big": 2**62 + 5,
}


def test_encoded_example_parses_with_protobuf():
    Example = example_class()
    parsed = Example.FromString(tfrecord.encode_example(VALUES))
    for key, value in VALUES.items():
        feature = parsed.features.feature[key]
        got = feature.bytes_list.value[0] if isinstance(value, bytes) else feature.int64_list.value[0]
        assert got == value, key


def test_protobuf_example_decodes():
    Example = example_class()
    message = Example()
    for key, value in VALUES.items():
        if isinstance(value, bytes):
            message.features.feature[key].bytes_list.value.append(value)
        else:
            message.features.feature[key].int64_list.value.extend([value, 7])  # packed, two values
    decoded = tfrecord.decode_example(message.SerializeToString())
    for key, value in VALUES.items():
        assert decoded[key] == ([value] if isinstance(value, bytes) else [value, 7]), key


def test_framing_and_corruption(tmp_path):
    payloads = [tfrecord.encode_example({"image/class/label": i, "image/encoded": b"x" * i}) for i in range(5)]
    framed = [tfrecord.frame(p) for p in payloads]
    for p, record in zip(payloads, framed):
        assert struct.unpack("<I", record[8:12])[0] == masked_crc32c(record[:8])
        assert struct.unpack("<I", record[-4:])[0] == masked_crc32c(p)
    path = tmp_path / "records"
    path.write_bytes(b"".join(framed))
    found = list(tfrecord.read_records(path))
    assert [p for _, _, p in found] == payloads
    assert [(o, s) for o, s, _ in found] == [(sum(map(len, framed[:i])), len(framed[i])) for i in range(5)]

    damaged = bytearray(path.read_bytes())
    damaged[found[3][0] + 14] ^= 1  # a payload byte of the fourth record
    path.write_bytes(bytes(damaged))
    with pytest.raises(UsageError, match=f"bad data checksum in the record at byte {found[3][0]}"):
        list(tfrecord.read_records(path))
    path.write_bytes(b"".join(framed)[:-3])
    with pytest.raises(UsageError, match="truncated"):
        list(tfrecord.read_records(path))
