defmodule Vllm.Native do
  @moduledoc false
  # The NIF (native/vllm_nif). Every function returns a plain term: `:ok`, `{:ok, value}`
  # or `{:error, {category, message}}`; callers wrap errors with `Vllm.Error.from_native/1`.

  @on_load :load_nif

  def load_nif do
    path = :filename.join(:code.priv_dir(:vllm), ~c"native/libvllm_nif")
    :erlang.load_nif(path, 0)
  end

  @doc "Starts an engine off the schedulers; answers `{:vllm_engine_started, ref, result}`."
  def engine_start(_opts, _reply_to, _ref), do: :erlang.nif_error(:nif_not_loaded)

  def add_request(_engine, _request_id, _prompt, _params, _to, _request_opts),
    do: :erlang.nif_error(:nif_not_loaded)

  def abort(_engine, _request_id), do: :erlang.nif_error(:nif_not_loaded)
  def stats(_engine), do: :erlang.nif_error(:nif_not_loaded)
  def shutdown(_engine), do: :erlang.nif_error(:nif_not_loaded)
  def encode(_engine, _text, _add_special_tokens), do: :erlang.nif_error(:nif_not_loaded)
  def decode(_engine, _ids, _skip_special_tokens), do: :erlang.nif_error(:nif_not_loaded)

  def apply_chat_template(_engine, _messages, _add_generation_prompt, _template),
    do: :erlang.nif_error(:nif_not_loaded)

  # Control and introspection (native/vllm_nif/src/control.rs).
  def engine_info(_engine), do: :erlang.nif_error(:nif_not_loaded)
  def memory_usage(_engine), do: :erlang.nif_error(:nif_not_loaded)
  def counters(_engine), do: :erlang.nif_error(:nif_not_loaded)
  def reset_prefix_cache(_engine, _reset_running), do: :erlang.nif_error(:nif_not_loaded)
  def ping(_engine, _timeout_ms), do: :erlang.nif_error(:nif_not_loaded)
  def sleep(_engine, _level), do: :erlang.nif_error(:nif_not_loaded)
  def wake_up(_engine, _weights, _kv_cache), do: :erlang.nif_error(:nif_not_loaded)
  def start_profile(_engine), do: :erlang.nif_error(:nif_not_loaded)
  def stop_profile(_engine, _path), do: :erlang.nif_error(:nif_not_loaded)
  def is_alive(_engine), do: :erlang.nif_error(:nif_not_loaded)
  def monitor_owner(_engine, _pid), do: :erlang.nif_error(:nif_not_loaded)
  def add_lora(_engine, _lora_request), do: :erlang.nif_error(:nif_not_loaded)
  def remove_lora(_engine, _lora_int_id), do: :erlang.nif_error(:nif_not_loaded)
  def pin_lora(_engine, _lora_int_id), do: :erlang.nif_error(:nif_not_loaded)
  def list_loras(_engine), do: :erlang.nif_error(:nif_not_loaded)

  # Reliability (native/vllm_nif/src/flow.rs, engine_ref.rs).
  def new_credit, do: :erlang.nif_error(:nif_not_loaded)
  def ack(_credit), do: :erlang.nif_error(:nif_not_loaded)
  def resource_counts, do: :erlang.nif_error(:nif_not_loaded)
  def watch_death(_engine, _pid), do: :erlang.nif_error(:nif_not_loaded)
  def inject_fault(_engine), do: :erlang.nif_error(:nif_not_loaded)

  # Pooling models (native/vllm_nif/src/pooling.rs).
  def pooling_request(_engine, _request_id, _prompt, _task, _params, _to),
    do: :erlang.nif_error(:nif_not_loaded)

  def supported_tasks(_engine), do: :erlang.nif_error(:nif_not_loaded)
end
