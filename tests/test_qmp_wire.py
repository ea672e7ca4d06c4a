"""StreamDecoder and encode(): QMP framing as a JSON value stream."""

import json

from plugin.qmp.wire import DecodeError, StreamDecoder, encode


def feed_all(chunks, **kwargs):
    decoder = StreamDecoder(**kwargs)
    out = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


def test_message_without_newline_is_decoded():
    assert feed_all([b'{"execute": "query-version"}']) == [{"execute": "query-version"}]


def test_message_split_at_every_byte_is_decoded():
    raw = b'{"execute": "x", "arguments": {"s": "a\\"}{[b", "n": [1, {"k": null}]}, "id": 7}'
    chunks = [raw[i:i + 1] for i in range(len(raw))]
    assert feed_all(chunks) == [json.loads(raw)]


def test_several_messages_in_one_chunk_are_all_decoded_in_order():
    raw = b'{"id": 1}{"id": 2}\r\n{"id": 3} {"id": 4}'
    assert feed_all([raw]) == [{"id": 1}, {"id": 2}, {"id": 3}, {"id": 4}]


def test_escaped_quote_split_across_chunks_stays_inside_string():
    assert feed_all([b'{"a": "x\\', b'"}"}']) == [{"a": 'x"}'}]


def test_multiline_message_is_one_message():
    assert feed_all([b'{\n  "execute": "stop"\n}\n']) == [{"execute": "stop"}]


def test_malformed_value_is_reported_then_next_message_decodes():
    out = feed_all([b'{"execute": }{"execute": "cont"}'])
    assert isinstance(out[0], DecodeError)
    assert out[0].desc.startswith("JSON parse error, ")
    assert out[1:] == [{"execute": "cont"}]


def test_unterminated_string_recovers_at_end_of_line():
    out = feed_all([b'{"execute": "stop}\n{"execute": "cont"}'])
    assert isinstance(out[0], DecodeError)
    assert out[1:] == [{"execute": "cont"}]


def test_reset_byte_drops_partial_value():
    out = feed_all([b'{"execute": "stop"', b"\xff", b'{"execute": "cont"}'])
    assert isinstance(out[0], DecodeError)
    assert out[1:] == [{"execute": "cont"}]


def test_reset_bytes_between_values_are_ignored():
    assert feed_all([b'\xff\x04{"id": 1}\xfe']) == [{"id": 1}]


def test_stray_closer_is_reported():
    out = feed_all([b'}{"id": 1}'])
    assert out == [DecodeError("JSON parse error, stray '}'"), {"id": 1}]


def test_array_is_rejected_as_non_object():
    assert feed_all([b'[1, 2]']) == [DecodeError("QMP input must be a JSON object")]


def test_top_level_scalars_are_rejected_as_non_objects():
    out = feed_all([b'42 "text" true null{"id": 1}'])
    assert out == [DecodeError("QMP input must be a JSON object")] * 4 + [{"id": 1}]


def test_bare_garbage_is_a_parse_error():
    out = feed_all([b'bogus\n'])
    assert len(out) == 1 and out[0].desc.startswith("JSON parse error, ")


def test_nan_is_rejected():
    out = feed_all([b'{"a": NaN}'])
    assert out[0].desc.startswith("JSON parse error, ")


def test_duplicate_key_is_rejected():
    out = feed_all([b'{"id": 1, "id": 2}'])
    assert out[0].desc.startswith("JSON parse error, ")


def test_invalid_utf8_is_a_parse_error():
    out = feed_all([b'{"a": "\xc3\x28"}'])
    assert out == [DecodeError("JSON parse error, invalid UTF-8 sequence")]


def test_oversized_message_yields_one_error_then_decoder_resynchronises():
    big = b'{"execute": "x", "arguments": {"blob": "' + b"a" * 5000 + b'", "n": [[{}]]}}'
    chunks = [big[i:i + 700] for i in range(0, len(big), 700)] + [b'{"id": 2}']
    out = feed_all(chunks, max_size=1024)
    assert out == [DecodeError("JSON message exceeds the size limit of 1024 bytes"), {"id": 2}]


def test_default_size_limit_is_one_mebibyte():
    big = b'{"blob": "' + b"a" * (1024 * 1024) + b'"}'
    out = feed_all([big, b'{"id": 2}'])
    assert isinstance(out[0], DecodeError) and "size limit" in out[0].desc
    assert out[1:] == [{"id": 2}]


def test_message_just_under_the_limit_is_accepted():
    raw = b'{"blob": "' + b"a" * 1000 + b'"}'
    assert feed_all([raw], max_size=len(raw)) == [{"blob": "a" * 1000}]


def test_too_deep_nesting_yields_one_error_then_resynchronises():
    out = feed_all([b"[" * 5000 + b"]" * 5000 + b'{"id": 3}'])
    assert out == [DecodeError("JSON nesting depth limit of 256 exceeded"), {"id": 3}]


def test_decoder_is_idle_only_between_values():
    decoder = StreamDecoder()
    decoder.feed(b'{"a": ')
    partial = decoder.idle
    decoder.feed(b'1}')
    assert (partial, decoder.idle) == (False, True)


def test_encode_is_compact_json_with_crlf():
    assert encode({"return": {}, "id": "a"}) == b'{"return":{},"id":"a"}\r\n'


def test_encode_output_decodes_back():
    msg = {"event": "X", "data": {"s": "é\n\"", "n": [1, 2.5]}}
    assert feed_all([encode(msg)]) == [msg]
