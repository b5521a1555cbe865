"""The shared request schema, the batch job's input and its output file, in-process (fast).

The server's bodies and the batch job's lines must refuse the same mistakes with the same
message; hostile values (lone surrogates anywhere, booleans as numbers, seeds torch cannot
take, non-UTF-8 bytes, deep nesting, endless numbers) must be a RequestError, never a crash
further down. The batch input keeps every line (a bad one spoils only itself, a repeated id
is an error naming the first line); the output file takes one writer at a time.
"""

from __future__ import annotations

import json
import os

import pytest

from megatron_lamina.batch.batch_job import read_batch
from megatron_lamina.batch.batch_output import BatchOutput, OutputError, check_output, check_output_free
from megatron_lamina.requests.request_schema import RequestError, decode_json
from megatron_lamina.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, read_body

SHARED_MISTAKES = [  # (fields, param, message): refused alike by the server and the batch job
    ({"temperature": 5}, "temperature", "temperature: must be a number in [0, 2]"),
    ({"temperature": True}, "temperature", "temperature: Input should be a valid number"),
    ({"top_p": 0}, "top_p", "top_p: must be a number in (0, 1]"),
    ({"seed": 2**64}, "seed", "seed: must be null or an integer in -9223372036854775808..18446744073709551615"),
    ({"seed": -2**63 - 1}, "seed", "seed: must be null or an integer in -9223372036854775808"),
    ({"max_tokens": -1}, "max_tokens", "max_tokens: Input should be greater than or equal to 0"),
    ({"max_tokens": "ten"}, "max_tokens", "max_tokens: Input should be a valid integer"),
    ({"stop": [""]}, "stop", "stop: stop strings must not be empty"),
    ({"prompt": [True, False]}, "prompt", "prompt: must be a string, a list of strings, a list of token ids, or "),
    ({"prompt": ["w1", 5]}, "prompt", "prompt: must be a string, a list of strings, a list of token ids, or "),
    ({"prompt": [[1], [True]]}, "prompt", "prompt: prompt 1 must be a string or a list of token ids"),
    ({"logit_bias": {"a": 1}}, "logit_bias", "logit_bias: keys must be token ids written as decimal strings"),
    ({"logit_bias": {"-5": 1}}, "logit_bias", "logit_bias: keys must be token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "logit_bias: must map token ids to biases in [-100, 100]"),
    ({"logit_bias": {"5": True}}, "logit_bias", "logit_bias: Input should be a valid number"),
    ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty: must be a number in [-2, 2]"),
    ({"frequency_penalty": -3}, "frequency_penalty", "frequency_penalty: must be a number in [-2, 2]"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty: must be a number in (0, 2]"),
    ({"min_p": 1.5}, "min_p", "min_p: must be a number in [0, 1]"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "stop_token_ids: must be a list of token ids (integers >= 0)"),
    ({"stop_token_ids": [True]}, "stop_token_ids", "stop_token_ids.0: Input should be a valid integer"),
    ({"prompt": ""}, "prompt", "prompt: the prompt is empty"),
    ({"prompt": "\ud800"}, "prompt", "prompt: not valid Unicode (a lone surrogate \\ud800 at index 0)"),
    ({"stop": ["ok", "\udfff"]}, "stop", "stop.1: not valid Unicode"),
    ({"colour": "red"}, "colour", "unknown field 'colour'"),
    # issue 23: no value may reach the sampler that overflows it, and stop strings are bounded
    ({"repetition_penalty": 2.5}, "repetition_penalty", "repetition_penalty: must be a number in (0, 2]"),
    ({"temperature": float("nan")}, "temperature", "temperature: must be a number in [0, 2]"),  # json: NaN
    ({"top_k": -2}, "top_k", "top_k: must be an integer >= -1"),
    ({"min_tokens": -1}, "min_tokens", "min_tokens: must be an integer >= 0"),
    ({"stop": ["s"] * 65}, "stop", "stop: at most 64 stop strings are allowed, got 65"),
    ({"stop": "s" * 1025}, "stop", "stop: a stop string may have at most 1024 characters, got one of 1025"),
    ({"stop": ["ok", "s" * 10_000_000]}, "stop", "stop: a stop string may have at most 1024 characters"),
]


def _server(fields: dict, model=CompletionRequest) -> ApiError:
    body = {"prompt": "w5", **fields} if model is CompletionRequest else fields
    with pytest.raises(ApiError) as e:
        read_body("application/json", json.dumps(body).encode(), model)
    return e.value


def _batch_error(tmp_path, *lines: bytes) -> list:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return read_batch(path)


@pytest.mark.parametrize("fields, param, message", SHARED_MISTAKES)
def test_server_and_batch_refuse_alike(tmp_path, fields, param, message):
    error = _server(fields)
    assert error.status == 400 and error.param == param and error.message.startswith(message), error.message
    [line] = _batch_error(tmp_path, json.dumps({"id": "a", "prompt": "w5", **fields}).encode())
    assert line.item is None and line.error == f"line 1: {error.message}"
    assert line.id == "a"


@pytest.mark.parametrize("messages, param, message", [
    ([{"role": "user", "content": "\ud83d"}], "messages", "messages.0.content: not valid Unicode"),
    ([{"role": "bot", "content": "hi"}], "messages", "messages.0.role: Input should be 'system'"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages",
     "messages.0.content.0.text: Input should be a valid string"),
    ([], "messages", "messages: List should have at least 1 item"),
])
def test_chat_messages_refused_alike(tmp_path, messages, param, message):
    error = _server({"messages": messages}, ChatCompletionRequest)
    assert error.param == param and error.message.startswith(message), error.message
    [line] = _batch_error(tmp_path, json.dumps({"id": 1, "messages": messages}).encode())
    assert line.error == f"line 1: {error.message}"


@pytest.mark.parametrize("raw, message", [
    (b'{"prompt": "caf\xe9"}', "not valid UTF-8 (byte 0xe9 at offset 15)"),
    (b'{"prompt": "a\x01b"}', "invalid JSON (Invalid control character at column 14)"),
    (b'{"prompt": "x",', "invalid JSON (Expecting property name enclosed in double quotes at column 16)"),
    (b"[" * 100_000, "invalid JSON (nested too deeply)"),
    (b'{"seed": ' + b"9" * 5000 + b"}", "invalid JSON (a number too long to read)"),
    (b'{"\\udc00": 1}', "a key: not valid Unicode"),
    (b'{"prompt": "ok \\u00e9", "stop": ["\\uD83D"]}', "stop.0: not valid Unicode"),  # upper-case hex too
    (b"[1]", "expected a JSON object, got an array"),
])
def test_bytes_that_are_no_request(raw, message):
    with pytest.raises(ApiError) as e:
        read_body(None, raw, CompletionRequest)
    assert e.value.status == 400 and e.value.message.startswith(message), e.value.message
    assert json.dumps(e.value.body()).encode("utf-8")  # the error body itself can be sent


def test_content_type():
    ok = read_body("application/json; charset=utf-8", b'{"prompt": [1, 2]}', CompletionRequest)
    assert ok.prompt == [[1, 2]] and read_body(None, b'{"prompt": "w"}', CompletionRequest).prompt == ["w"]
    with pytest.raises(ApiError) as e:
        read_body("application/x-www-form-urlencoded", b'{"prompt": "w"}', CompletionRequest)
    assert e.value.status == 415 and "content-type: application/json" in e.value.message


def test_numbers_at_the_limits_pass():
    body = read_body(None, json.dumps({"prompt": "w", "seed": 2**64 - 1, "temperature": 1e-40,
                                       "top_p": 1e-46}).encode(), CompletionRequest)
    params = body.sampling_params(4)
    assert params.seed == 2**64 - 1 and params.temperature == 0.0 and params.top_p == params.MIN_TOP_P
    with pytest.raises(RequestError, match="not valid UTF-8"):
        decode_json(b"\xed\xa0\x80")  # a surrogate encoded as UTF-8 bytes: not UTF-8 either


def test_every_line_is_kept_and_ids_are_keys(tmp_path):
    lines = _batch_error(
        tmp_path,
        b'\xef\xbb\xbf{"id": "a", "prompt": "w1"}',           # a byte-order mark before line 1
        b'{"id": "b", "prompt": "caf\xe9"}',                   # Latin-1, not UTF-8
        b'{"id": "a", "prompt": "w2"}',                        # a duplicate id
        b"",
        b'{"id": true, "prompt": "w3"}',                       # an id of the wrong type
        b'{"id": "c", "messages": [{"role": "user", "content": "w4"}], "temperature": 0}',
        b'{"id": "c", "prompt": "w5", "temperature": 9}',      # a duplicate of a good line, itself bad too
    )
    assert [line.line_no for line in lines] == [1, 2, 3, 5, 6, 7]
    assert [line.error is None for line in lines] == [True, False, False, False, True, False]
    assert lines[1].error == "line 2: not valid UTF-8 (byte 0xe9 at offset 26); send UTF-8 text" and lines[1].id is None
    assert lines[2].error == "line 3: duplicate id 'a' (first on line 1); ids are the job's keys"
    assert lines[2].key == ("line", 3) and lines[2].error_record()["id"] is None
    assert lines[3].error.startswith("line 5: id: Input should be a valid") and lines[3].key == ("line", 5)
    assert lines[4].item.messages == [{"role": "user", "content": "w4"}] and lines[4].item.params.temperature == 0
    assert lines[5].error.startswith("line 7: duplicate id 'c' (first on line 6)")


def test_output_takes_one_writer_and_resumes(tmp_path):
    path = tmp_path / "new" / "dir" / "out.jsonl"
    first = BatchOutput.open(path, resume=False)  # creates the directory
    first.write({"id": "a", "text": "x", "token_ids": [1], "finish_reason": "length"})
    with pytest.raises(OutputError) as e:  # a second open file description: flock refuses it
        BatchOutput.open(path, resume=True)
    assert str(e.value).startswith(f"{path}: another job (pid {os.getpid()}) is writing it")
    with pytest.raises(OutputError):
        check_output_free(path)
    first.write({"id": None, "line": 4, "error": "line 4: bad", "finish_reason": "error"})
    first._file.write(b'{"id": "cut sh')  # a record cut short by a kill
    first.close()
    check_output_free(path)
    again = BatchOutput.open(path, resume=True)
    assert again.done == {"a": False, ("line", 4): True}
    again.close()
    assert path.read_bytes().endswith(b'"error"}\n')
    with pytest.raises(OutputError, match=r"out.jsonl already holds \d+ bytes; pass --resume .* or --overwrite"):
        BatchOutput.open(path, resume=False)
    assert path.read_bytes().endswith(b'"error"}\n')  # refused: nothing lost
    BatchOutput.open(path, resume=False, overwrite=True).close()
    assert path.read_bytes() == b""
    path.write_text("not json\n")
    with pytest.raises(OutputError, match=r"out.jsonl:1: not a record of a batch job"):
        BatchOutput.open(path, resume=True)


def _input_file(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "prompt": "w5"}\n')
    return source


@pytest.mark.parametrize("how", ["same path", "another spelling", "symlink", "symlinked directory", "hard link"])
@pytest.mark.parametrize("resume", [False, True])
def test_output_that_is_the_input_is_refused(tmp_path, how, resume):
    """Issue 23: `--output` naming the input by any path empties the input; it is refused
    before anything is written, by the launcher's check and by `open` alike."""
    source = _input_file(tmp_path)
    output = {"same path": source, "another spelling": tmp_path / "sub" / ".." / "in.jsonl"}.get(how)
    (tmp_path / "sub").mkdir()
    if how == "symlink":
        output = tmp_path / "out.jsonl"
        output.symlink_to(source)
    elif how == "symlinked directory":
        (tmp_path / "linked").symlink_to(tmp_path)
        output = tmp_path / "linked" / "in.jsonl"
    elif how == "hard link":
        output = tmp_path / "out.jsonl"
        os.link(source, output)
    for overwrite in ([False] if resume else [False, True]):  # --overwrite does not allow it either
        with pytest.raises(OutputError, match=r"is the input file .*in.jsonl.*choose another output file"):
            check_output(output, source, resume, overwrite)
        with pytest.raises(OutputError, match="is the input file"):
            BatchOutput.open(output, resume, overwrite, input_path=source)
    assert source.read_text() == '{"id": 1, "prompt": "w5"}\n'


def test_existing_output_needs_resume_or_overwrite(tmp_path):
    source, output = _input_file(tmp_path), tmp_path / "out.jsonl"
    check_output(output, source, resume=False, overwrite=False)  # not there yet: fine
    output.write_text("")
    check_output(output, source, resume=False, overwrite=False)  # empty: nothing to lose
    output.write_text('{"id": 1, "text": "x", "token_ids": [1], "finish_reason": "length"}\n')
    with pytest.raises(OutputError) as e:
        check_output(output, source, resume=False, overwrite=False)
    assert str(e.value) == (f"{output} already holds 68 bytes; pass --resume to keep its records and run only the "
                            "lines missing there, or --overwrite to replace it")
    check_output(output, source, resume=True, overwrite=False)
    check_output(output, source, resume=False, overwrite=True)
    with pytest.raises(OutputError, match="--resume keeps the records in --output and --overwrite replaces them"):
        check_output(output, source, resume=True, overwrite=True)
    assert output.stat().st_size == 68
    BatchOutput.open(output, resume=True, input_path=source).close()
    assert output.stat().st_size == 68


# ------------------------------------------------------------- the fields of issue 15

NEW_FIELDS = {"min_p": 0.1, "presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.3,
              "stop_token_ids": [7, 9], "logit_bias": {"5": -100, "17": 2.5}, "seed": 4}


def test_new_sampling_fields_reach_the_engine_alike(tmp_path):
    server = read_body(None, json.dumps({"prompt": "w5", **NEW_FIELDS}).encode(), CompletionRequest)
    [line] = _batch_error(tmp_path, json.dumps({"id": 1, "prompt": "w5", **NEW_FIELDS}).encode())
    for params in (server.sampling_params(16), line.item.params):
        assert (params.min_p, params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == \
            (0.1, 0.5, -0.25, 1.3)
        assert params.stop_token_ids == [7, 9] and params.logit_bias == {5: -100.0, 17: 2.5}
        assert params.logprobs is None and params.prompt_logprobs is None


@pytest.mark.parametrize("fields, param, message", [
    ({"n": 17}, "n", "n: Input should be less than or equal to 16"),
    ({"n": 0}, "n", "n: Input should be greater than or equal to 1"),
    ({"n": True}, "n", "n: Input should be a valid integer"),
    ({"n": 2, "best_of": 3}, "best_of", "best_of: only best_of = n (2) is supported"),
    ({"suffix": "x"}, "suffix", "suffix: not supported"),
    ({"response_format": {"type": "json_schema"}}, "response_format",
     'response_format: json_schema is required with type "json_schema"'),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", "one output constraint per request"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools: tools are a chat feature"),
    ({"tool_choice": "auto"}, "tool_choice", "tool_choice: tools are a chat feature"),
    ({"modalities": ["audio"]}, "modalities", 'modalities: only ["text"] is supported'),
    ({"logprobs": 21}, "logprobs", "logprobs: must be null or an integer in 0..20"),
    ({"logprobs": True}, "logprobs", "logprobs: Input should be a valid integer"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens: 0 generates nothing and is allowed only with echo: true"),
    ({"n": 3, "seed": 2**64 - 2}, "seed", "seed: with n = 3 the samples take seeds seed .. seed + 2"),
])
def test_completion_only_fields(fields, param, message):
    error = _server(fields)
    assert error.status == 400 and error.param == param and error.message.startswith(message), error.message


def test_neutral_values_of_unimplemented_fields_pass():
    body = read_body(None, json.dumps({"prompt": "w5", "response_format": {"type": "text"}, "tool_choice": "none",
                                       "tools": [], "best_of": 2, "n": 2, "suffix": None, "echo": True,
                                       "logprobs": 0, "max_tokens": 0}).encode(), CompletionRequest)
    assert body.logprob_counts() == (0, 0)
    chat = read_body(None, json.dumps({"messages": [{"role": "user", "content": "w5"}], "logprobs": True,
                                       "top_logprobs": 3, "tool_choice": "none"}).encode(), ChatCompletionRequest)
    assert chat.logprob_counts() == (3, None)
    error = _server({"messages": [{"role": "user", "content": "w5"}], "top_logprobs": 2}, ChatCompletionRequest)
    assert error.param == "top_logprobs" and error.message == "top_logprobs: needs logprobs: true"


@pytest.mark.parametrize("prompt, expected", [
    ("w5", ["w5"]), (["w5"], ["w5"]), (["w5", "w6"], ["w5", "w6"]), ([4, 5], [[4, 5]]), ([[4, 5]], [[4, 5]]),
    ([[4, 5], [6]], [[4, 5], [6]]), (["w5", [6]], ["w5", [6]]),
])
def test_prompt_lists(prompt, expected):
    body = read_body(None, json.dumps({"prompt": prompt}).encode(), CompletionRequest)
    assert body.prompt == expected
    assert [item.prompt or item.prompt_token_ids for item in body.prompt_inputs()] == expected


def test_n_samples_take_consecutive_seeds():
    body = read_body(None, b'{"prompt": "w5", "n": 3, "seed": 7}', CompletionRequest)
    assert [p.seed for p in body.sample_params(body.sampling_params(4))] == [7, 8, 9]
    unseeded = read_body(None, b'{"prompt": "w5", "n": 2}', CompletionRequest)
    assert [p.seed for p in unseeded.sample_params(unseeded.sampling_params(4))] == [None, None]


def test_batch_lines_take_logprobs_and_score_prompts(tmp_path):
    lines = _batch_error(
        tmp_path,
        b'{"id": 1, "prompt": "w5", "logprobs": 2, "prompt_logprobs": 0}',
        b'{"id": 2, "prompt": [4, 5], "max_tokens": 0, "prompt_logprobs": 1}',
        b'{"id": 3, "prompt": "w5", "max_tokens": 0}',
        b'{"id": 4, "prompt": ["w5", "w6"]}',
        b'{"id": 5, "prompt": "w5", "n": 2}',
    )
    assert (lines[0].item.params.logprobs, lines[0].item.params.prompt_logprobs) == (2, 0)
    assert lines[1].item.params.max_tokens == 0 and lines[1].item.prompt_token_ids == [4, 5]
    assert lines[2].error == ("line 3: max_tokens: 0 generates nothing and is allowed only with prompt_logprobs "
                              "(to score the prompt)")
    assert lines[3].error == "line 4: prompt: one prompt per line: put each prompt on a line of its own"
    assert lines[4].error == "line 5: unknown field 'n'"
