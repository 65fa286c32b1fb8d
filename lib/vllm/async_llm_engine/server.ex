defmodule Vllm.AsyncLLMEngine.Server do
  @moduledoc false
  # The engine process. It owns the engine cores (data-parallel replicas: one NIF engine
  # resource each, with its own KV cache and threads), routes each new request to the
  # least-loaded core, keeps the registry of live requests and their owners' monitors,
  # holds new requests while generation is paused or the engine sleeps, and answers the
  # callers that wait for a drain, a pause or a shrink.

  use GenServer

  require Logger

  alias Vllm.{CompletionOutput, Error, Native, RequestOutput}

  defstruct cores: %{},
            draining: MapSet.new(),
            load: %{},
            weights: %{},
            native: %{},
            requests: %{},
            owners: %{},
            queue: [],
            paused: false,
            sleep_level: 0,
            waiters: [],
            loading: nil,
            profiler_dir: nil,
            profiling: false,
            log_mark: nil,
            max_queued: nil,
            stopped: false

  ## Starting: the caller loads the cores, this process takes them over.

  def start(cores, native, opts, link?) do
    gen_opts = if opts[:name], do: [name: opts[:name]], else: []
    init_arg = {cores, native, opts}

    if link?,
      do: GenServer.start_link(__MODULE__, init_arg, gen_opts),
      else: GenServer.start(__MODULE__, init_arg, gen_opts)
  end

  @doc "Loads `count` cores concurrently; `{:ok, [resource]}` or the first error."
  def load_cores(native, count, timeout) do
    # A start the NIF refuses at once (bad options, a device this build lacks) sends no
    # message: wait only for the cores that did start, and shut those down on an error.
    {started, refused} =
      Enum.reduce_while(0..(count - 1), {[], nil}, fn rank, {refs, nil} ->
        ref = make_ref()

        case Native.engine_start(core_native(native, rank), self(), ref) do
          :ok -> {:cont, {[ref | refs], nil}}
          {:error, reason} -> {:halt, {refs, Error.from_native(reason)}}
        end
      end)

    deadline = System.monotonic_time(:millisecond) + timeout

    results =
      Enum.map(Enum.reverse(started), fn ref ->
        wait = max(deadline - System.monotonic_time(:millisecond), 0)

        receive do
          {:vllm_engine_started, ^ref, {:ok, resource}} -> {:ok, resource}
          {:vllm_engine_started, ^ref, {:error, reason}} -> {:error, Error.from_native(reason)}
        after
          wait -> {:error, Error.new(:timeout, "the model did not load within #{timeout} ms")}
        end
      end)

    case refused || Enum.find_value(results, fn r -> match?({:error, _}, r) && elem(r, 1) end) do
      nil ->
        {:ok, Enum.map(results, fn {:ok, r} -> r end)}

      error ->
        for {:ok, r} <- results, do: Native.shutdown(r)
        {:error, error}
    end
  end

  @doc """
  The native options of engine core `rank`: on GPUs `tensor_parallel_size` devices each
  (default 1), counting from the one named (`"cuda"` = `"cuda:0"` gives core i
  `"cuda:i"`, or `"cuda:(i * tp)"` onwards with tensor parallel); CPU cores share the CPU.
  """
  def core_native(%{device: device} = native, rank) when is_binary(device) do
    stride = Map.get(native, :tensor_parallel_size) || 1

    case Regex.run(~r/^(?:gpu|cuda(?::(\d+))?)$/, device) do
      [_] -> %{native | device: "cuda:#{rank * stride}"}
      [_, first] -> %{native | device: "cuda:#{String.to_integer(first) + rank * stride}"}
      nil -> native
    end
  end

  def core_native(native, _rank), do: native

  @impl true
  def init({cores, native, opts}) do
    Process.flag(:trap_exit, true)
    cores = cores |> Enum.with_index() |> Map.new(fn {r, i} -> {i, r} end)
    # Whatever way this process ends (even :kill), the engines' threads end with it.
    Enum.each(cores, fn {_, r} -> Native.monitor_owner(r, self()) end)
    # A core that dies of an internal error says so: this process then stops (and its
    # supervisor, if any, starts a fresh engine).
    Enum.each(cores, fn {_, r} -> Native.watch_death(r, self()) end)
    # Visible to every connected node as a server of this model (Vllm.Cluster).
    Vllm.Cluster.join(Vllm.Cluster.model_name(opts), self())

    {:ok,
     %__MODULE__{
       cores: cores,
       load: Map.new(cores, fn {rank, _} -> {rank, 0} end),
       native: native,
       profiler_dir: opts[:profiler_dir],
       log_mark: log_mark(cores),
       max_queued: max_queued(opts, cores)
     }}
  end

  ## Requests

  @impl true
  def handle_call(:cores, _from, state), do: {:reply, {:ok, ordered_cores(state)}, state}

  def handle_call(:status, _from, state) do
    {:reply,
     %{
       paused: state.paused,
       sleep_level: state.sleep_level,
       num_cores: map_size(state.cores),
       num_requests: map_size(state.requests),
       num_queued: length(state.queue),
       profiler_dir: state.profiler_dir
     }, state}
  end

  def handle_call({:add_request, id, prompt, params, owner, request_opts}, _from, state) do
    cond do
      Map.has_key?(state.requests, id) ->
        {:reply,
         {:error,
          Error.validation("request_id #{inspect(id)} is already in use by a live request")},
         state}

      (rank = request_opts[:data_parallel_rank]) != nil and
          (not Map.has_key?(state.cores, rank) or MapSet.member?(state.draining, rank)) ->
        {:reply,
         {:error,
          Error.validation(
            "data_parallel_rank #{inspect(rank)} is not a serving engine core (ranks: #{inspect(serving_ranks(state))})"
          )}, state}

      holding?(state) and state.max_queued != nil and length(state.queue) >= state.max_queued ->
        {:reply,
         {:error,
          Error.new(
            :resource_exhausted,
            "#{state.max_queued} requests already wait for the engine to resume (max_num_seqs + max_waiting_requests): retry later"
          )}, state}

      holding?(state) ->
        # Paused or asleep: the request waits here, it is not lost.
        entry = {id, prompt, params, owner, request_opts}
        state = register(state, id, owner, :queued)
        {:reply, :ok, %{state | queue: [entry | state.queue]}}

      true ->
        case submit(state, id, prompt, params, owner, request_opts) do
          {:ok, state} -> {:reply, :ok, state}
          {:error, error} -> {:reply, {:error, error}, state}
        end
    end
  end

  def handle_call({:abort, ids}, _from, state) do
    {:reply, :ok, Enum.reduce(ids, state, &abort_one/2)}
  end

  ## Flow control

  def handle_call({:pause, wait?, clear_cache?}, from, state) do
    state = %{state | paused: true}

    if wait? do
      state = add_waiter(state, {:pause, clear_cache?}, from, :infinity)
      {:noreply, check_waiters(state)}
    else
      state = abort_in_flight(state)
      state = add_waiter(state, {:pause, clear_cache?}, from, :infinity)
      {:noreply, check_waiters(state)}
    end
  end

  def handle_call(:resume, _from, state) do
    {:reply, :ok, flush_queue(%{state | paused: false})}
  end

  def handle_call({:drain, timeout_ms}, from, state) do
    {:noreply, state |> add_waiter(:drain, from, timeout_ms) |> check_waiters()}
  end

  def handle_call({:sleep, level}, _from, state) do
    # The cores abort their in-flight requests themselves (their KV memory goes).
    case each_core(state, &Native.sleep(&1, level)) do
      :ok -> {:reply, :ok, %{state | sleep_level: max(state.sleep_level, level)}}
      error -> {:reply, error, state}
    end
  end

  def handle_call({:wake_up, weights?, kv?}, _from, state) do
    case each_core(state, &Native.wake_up(&1, weights?, kv?)) do
      :ok ->
        level =
          state.cores
          |> Enum.map(fn {_, r} ->
            case Native.memory_usage(r) do
              {:ok, m} -> m.sleep_level
              _ -> 0
            end
          end)
          |> Enum.max(fn -> 0 end)

        {:reply, :ok, flush_queue(%{state | sleep_level: level})}

      error ->
        {:reply, error, state}
    end
  end

  ## Data-parallel scaling

  def handle_call({:scale, _n, _timeout_ms}, _from, %{loading: loading} = state)
      when loading != nil do
    {:reply, {:error, Error.validation("a scale_elastic_ep to #{loading.target} is in progress")},
     state}
  end

  def handle_call({:scale, n, timeout_ms}, from, state) do
    current = map_size(state.cores)

    cond do
      n == current ->
        {:reply, :ok, state}

      n > current ->
        refs =
          Map.new(current..(n - 1), fn rank ->
            ref = make_ref()
            {ref, {rank, Native.engine_start(core_native(state.native, rank), self(), ref)}}
          end)

        case Enum.find(refs, fn {_, {_, started}} -> started != :ok end) do
          nil ->
            refs = Map.new(refs, fn {ref, {rank, _}} -> {ref, rank} end)
            {:noreply, %{state | loading: %{from: from, target: n, refs: refs, loaded: %{}}}}

          {_, {_, {:error, reason}}} ->
            {:reply, {:error, Error.from_native(reason)}, state}
        end

      true ->
        # Shrink: the highest ranks take no new requests and go once they are idle.
        ranks = Enum.to_list(n..(current - 1))
        state = %{state | draining: MapSet.union(state.draining, MapSet.new(ranks))}
        {:noreply, state |> add_waiter({:shrink, ranks}, from, timeout_ms) |> check_waiters()}
    end
  end

  ## Caches, profiling, stats

  def handle_call({:start_profile, dir}, _from, state) do
    case each_core(state, &Native.start_profile/1) do
      :ok -> {:reply, :ok, %{state | profiling: true, profiler_dir: dir}}
      error -> {:reply, error, state}
    end
  end

  def handle_call(:stop_profile, _from, state) do
    stamp = System.os_time(:millisecond)
    dir = state.profiler_dir

    paths =
      Enum.map(ordered_cores(state), fn {rank, r} ->
        path = Path.join(dir, "vllm-trace-#{stamp}-dp#{rank}.json")

        case Native.stop_profile(r, path) do
          {:ok, _summary} -> {:ok, path}
          {:error, reason} -> {:error, Error.from_native(reason)}
        end
      end)

    state = %{state | profiling: false}

    case Enum.find(paths, &match?({:error, _}, &1)) do
      nil ->
        paths = Enum.map(paths, fn {:ok, p} -> p end)
        {:reply, {:ok, if(length(paths) == 1, do: hd(paths), else: paths)}, state}

      error ->
        {:reply, error, state}
    end
  end

  def handle_call(:log_stats, _from, state) do
    {line, mark} = stats_line(state)
    Logger.info(line)
    {:reply, :ok, %{state | log_mark: mark}}
  end

  def handle_call(:shutdown, _from, state) do
    {:stop, :normal, :ok, stop_everything(state)}
  end

  ## Messages

  @impl true
  def handle_info({:vllm_request_done, id}, state),
    do: {:noreply, state |> unregister(id) |> check_waiters()}

  def handle_info({:vllm_engine_dead, message}, state) do
    Logger.error("engine core died: #{message}")

    for {id, {owner, :queued}} <- state.requests,
        do: send(owner, {:vllm_error, id, {:engine_dead, message}})

    state =
      stop_everything(%{
        state
        | requests: Map.reject(state.requests, &match?({_, {_, :queued}}, &1))
      })

    {:stop, {:shutdown, {:engine_dead, message}}, state}
  end

  def handle_info({:vllm_engine_started, ref, result}, %{loading: %{refs: refs}} = state)
      when is_map_key(refs, ref) do
    loading = state.loading
    {rank, refs} = Map.pop(refs, ref)

    loaded =
      case result do
        {:ok, resource} -> Map.put(loading.loaded, rank, {:ok, resource})
        {:error, reason} -> Map.put(loading.loaded, rank, {:error, Error.from_native(reason)})
      end

    if map_size(refs) > 0 do
      {:noreply, %{state | loading: %{loading | refs: refs, loaded: loaded}}}
    else
      {:noreply, finish_scale_up(%{state | loading: nil}, loading.from, loaded)}
    end
  end

  def handle_info({:waiter_timeout, tag}, state) do
    case Enum.split_with(state.waiters, fn w -> w.tag == tag end) do
      {[waiter], rest} ->
        state = %{state | waiters: rest}

        state =
          case waiter.kind do
            # The shrink gives up: the cores keep serving, nothing was dropped.
            {:shrink, ranks} ->
              %{state | draining: MapSet.difference(state.draining, MapSet.new(ranks))}

            _ ->
              state
          end

        GenServer.reply(
          waiter.from,
          {:error,
           Error.new(
             :timeout,
             "#{describe(waiter.kind)}: requests were still running after the drain_timeout"
           )}
        )

        {:noreply, state}

      _ ->
        {:noreply, state}
    end
  end

  def handle_info({:DOWN, _ref, :process, owner, _reason}, state) do
    case Map.pop(state.owners, owner) do
      {nil, _} ->
        {:noreply, state}

      {{_ref, ids}, owners} ->
        state = %{state | owners: owners}

        state =
          Enum.reduce(ids, state, fn id, acc ->
            case Map.get(acc.requests, id) do
              {_owner, :queued} ->
                %{acc | queue: Enum.reject(acc.queue, &(elem(&1, 0) == id))}

              {_owner, rank} ->
                if core = acc.cores[rank], do: Native.abort(core, id)
                acc

              nil ->
                acc
            end
            |> drop_request(id)
          end)

        {:noreply, check_waiters(state)}
    end
  end

  # Vllm.Cluster's load query: pending tokens per serving core.
  def handle_info({:vllm_cluster_load, ref, from}, state) do
    serving = serving_ranks(state)
    pending = serving |> Enum.map(&Map.get(state.load, &1, 0)) |> Enum.sum()
    send(from, {:vllm_cluster_load, ref, self(), pending / max(length(serving), 1)})
    {:noreply, state}
  end

  # Exits are trapped so that terminate/2 shuts the engine down; like an untrapped link,
  # a normal exit of a linked process does not stop the engine.
  def handle_info({:EXIT, _pid, :normal}, state), do: {:noreply, state}
  def handle_info({:EXIT, _pid, reason}, state), do: {:stop, reason, state}
  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    unless state.stopped, do: stop_everything(state)
    :ok
  end

  ## Internals

  # Requests that may wait here while paused or asleep (nil: no limit).
  defp max_queued(opts, cores) do
    case opts[:max_waiting_requests] do
      nil -> nil
      waiting -> waiting + running_limit(cores)
    end
  end

  # The engine's max_num_seqs as it resolved it (the default depends on the device).
  defp running_limit(cores) do
    case Native.engine_info(cores[0]) do
      {:ok, %{max_num_seqs: n}} -> n
      _ -> 0
    end
  end

  defp holding?(state), do: state.paused or state.sleep_level > 0

  defp serving_ranks(state),
    do:
      state.cores |> Map.keys() |> Enum.reject(&MapSet.member?(state.draining, &1)) |> Enum.sort()

  defp ordered_cores(state), do: Enum.sort_by(state.cores, fn {rank, _} -> rank end)

  # Least-loaded serving core (pending tokens of the requests it runs or holds: see
  # request_weight/2), lowest rank on ties.
  defp pick_rank(state, nil),
    do: serving_ranks(state) |> Enum.min_by(&{Map.get(state.load, &1, 0), &1})

  defp pick_rank(_state, rank), do: rank

  defp submit(state, id, prompt, params, owner, request_opts) do
    rank = pick_rank(state, request_opts[:data_parallel_rank])
    native_opts = Map.take(request_opts, [:priority, :lora_request, :credit, :max_unread])

    case native_add_request(state.cores[rank], id, prompt, params, owner, native_opts) do
      :ok ->
        state = %{state | weights: Map.put(state.weights, id, request_weight(prompt, params))}
        {:ok, register(state, id, owner, rank)}

      {:error, reason} ->
        {:error, Error.from_native(reason)}
    end
  end

  # A NIF exception must not take the engine process (and every request) down with it.
  defp native_add_request(resource, id, prompt, params, owner, request_opts) do
    Native.add_request(
      resource,
      id,
      prompt,
      params,
      owner,
      Map.put(request_opts, :watcher, self())
    )
  rescue
    exception -> {:error, {:internal, "add_request failed: " <> Exception.message(exception)}}
  end

  # Submits what waited while paused or asleep, in arrival order.
  defp flush_queue(state) do
    if holding?(state) do
      state
    else
      state.queue
      |> Enum.reverse()
      |> Enum.reduce(%{state | queue: []}, fn {id, prompt, params, owner, opts}, acc ->
        acc = drop_request(acc, id)

        case submit(acc, id, prompt, params, owner, opts) do
          {:ok, acc} ->
            acc

          {:error, %Error{} = e} ->
            send(owner, {:vllm_error, id, {e.category, e.message}})
            acc
        end
      end)
    end
  end

  defp abort_one(id, state) do
    case Map.get(state.requests, id) do
      {owner, :queued} ->
        send(owner, {:vllm, id, aborted_output(state, id)})
        %{state | queue: Enum.reject(state.queue, &(elem(&1, 0) == id))} |> unregister(id)

      {_owner, rank} ->
        if core = state.cores[rank], do: Native.abort(core, id)
        state

      nil ->
        state
    end
  end

  defp abort_in_flight(state) do
    Enum.each(state.requests, fn
      {_id, {_owner, :queued}} -> :ok
      {id, {_owner, rank}} -> if core = state.cores[rank], do: Native.abort(core, id)
    end)

    state
  end

  defp aborted_output(state, id) do
    prompt =
      Enum.find_value(state.queue, fn
        {^id, prompt, _, _, _} -> prompt
        _ -> nil
      end)

    %RequestOutput{
      request_id: id,
      prompt: if(is_binary(prompt), do: prompt),
      prompt_token_ids: if(is_list(prompt), do: prompt, else: []),
      outputs: [
        %CompletionOutput{index: 0, text: "", token_ids: [], finish_reason: :abort}
      ],
      finished: true,
      num_cached_tokens: 0
    }
  end

  defp each_core(state, fun) do
    Enum.reduce_while(ordered_cores(state), :ok, fn {_rank, r}, :ok ->
      case fun.(r) do
        :ok -> {:cont, :ok}
        {:ok, _} -> {:cont, :ok}
        {:error, reason} -> {:halt, {:error, Error.from_native(reason)}}
      end
    end)
  end

  defp finish_scale_up(state, from, loaded) do
    case Enum.find(loaded, fn {_, r} -> match?({:error, _}, r) end) do
      nil ->
        cores = Map.new(loaded, fn {rank, {:ok, r}} -> {rank, r} end)
        Enum.each(cores, fn {_, r} -> Native.monitor_owner(r, self()) end)
        Enum.each(cores, fn {_, r} -> Native.watch_death(r, self()) end)
        if state.profiling, do: Enum.each(cores, fn {_, r} -> Native.start_profile(r) end)
        # New cores join in the state of the others: asleep if they sleep.
        if state.sleep_level > 0,
          do: Enum.each(cores, fn {_, r} -> Native.sleep(r, state.sleep_level) end)

        GenServer.reply(from, :ok)

        %{
          state
          | cores: Map.merge(state.cores, cores),
            load: Map.merge(state.load, Map.new(cores, fn {rank, _} -> {rank, 0} end))
        }

      {_, {:error, error}} ->
        for {_, {:ok, r}} <- loaded, do: Native.shutdown(r)
        GenServer.reply(from, {:error, error})
        state
    end
  end

  ## Waiters: callers answered once the requests they wait for have ended.

  defp add_waiter(state, kind, from, timeout_ms) do
    tag = make_ref()

    if timeout_ms != :infinity,
      do: Process.send_after(self(), {:waiter_timeout, tag}, timeout_ms)

    %{state | waiters: state.waiters ++ [%{kind: kind, from: from, tag: tag}]}
  end

  defp check_waiters(state) do
    {done, waiting} = Enum.split_with(state.waiters, &satisfied?(state, &1.kind))
    Enum.reduce(done, %{state | waiters: waiting}, &complete_waiter/2)
  end

  defp satisfied?(state, {:shrink, ranks}),
    do: Enum.all?(ranks, &(Map.get(state.load, &1, 0) == 0))

  defp satisfied?(state, _drain_or_pause), do: in_flight(state) == 0

  defp in_flight(state),
    do: Enum.count(state.requests, fn {_, {_, where}} -> where != :queued end)

  defp complete_waiter(%{kind: {:pause, clear_cache?}, from: from}, state) do
    if clear_cache?, do: reset_prefix_caches(state)
    GenServer.reply(from, :ok)
    state
  end

  defp complete_waiter(%{kind: {:shrink, ranks}, from: from}, state) do
    Enum.each(ranks, &Native.shutdown(state.cores[&1]))
    GenServer.reply(from, :ok)

    %{
      state
      | cores: Map.drop(state.cores, ranks),
        load: Map.drop(state.load, ranks),
        draining: MapSet.difference(state.draining, MapSet.new(ranks))
    }
  end

  defp complete_waiter(%{from: from}, state) do
    GenServer.reply(from, :ok)
    state
  end

  defp describe(:drain), do: "wait_for_requests_to_drain"
  defp describe({:shrink, _}), do: "scale_elastic_ep"
  defp describe(_), do: "pause_generation"

  # After a pause nothing runs: every core can forget its cached prefixes.
  defp reset_prefix_caches(state) do
    Enum.each(state.cores, fn {_, r} -> Native.reset_prefix_cache(r, false) end)
  end

  ## Registry

  defp register(state, id, owner, where) do
    owners =
      Map.update(state.owners, owner, {Process.monitor(owner), MapSet.new([id])}, fn {ref, ids} ->
        {ref, MapSet.put(ids, id)}
      end)

    weight = Map.get(state.weights, id, 1)

    load =
      if where == :queued,
        do: state.load,
        else: Map.update(state.load, where, weight, &(&1 + weight))

    %{state | requests: Map.put(state.requests, id, {owner, where}), owners: owners, load: load}
  end

  # Forgets a request and its owner's monitor when it was the owner's last one.
  defp unregister(state, id) do
    case Map.get(state.requests, id) do
      nil ->
        state

      {owner, _} ->
        state = drop_request(state, id)

        owners =
          case Map.fetch(state.owners, owner) do
            {:ok, {ref, ids}} ->
              ids = MapSet.delete(ids, id)

              if MapSet.size(ids) == 0 do
                Process.demonitor(ref, [:flush])
                Map.delete(state.owners, owner)
              else
                Map.put(state.owners, owner, {ref, ids})
              end

            :error ->
              state.owners
          end

        %{state | owners: owners}
    end
  end

  # Forgets the request and its core's load (not the owner's monitor).
  defp drop_request(state, id) do
    case Map.pop(state.requests, id) do
      {nil, _} ->
        state

      {{_owner, where}, requests} ->
        {weight, weights} = Map.pop(state.weights, id, 1)

        load =
          if where == :queued,
            do: state.load,
            else: Map.update(state.load, where, 0, &max(&1 - weight, 0))

        %{state | requests: requests, load: load, weights: weights}
    end
  end

  # The tokens a request will cost its core: its prompt (text: ~4 bytes a token, not
  # tokenized twice) and the most it may generate. Never below 1, so an idle core is 0.
  defp request_weight(prompt, params) do
    prompt_tokens = if is_binary(prompt), do: div(byte_size(prompt), 4), else: length(prompt)
    max_tokens = if is_integer(params[:max_tokens]), do: params[:max_tokens], else: 16
    n = if is_integer(params[:n]), do: params[:n], else: 1
    max(prompt_tokens + max_tokens * n, 1)
  end

  defp stop_everything(state) do
    for {id, {owner, :queued}} <- state.requests,
        do: send(owner, {:vllm, id, aborted_output(state, id)})

    # Each core's in-flight requests get a final output with finish_reason :abort.
    Enum.each(state.cores, fn {_, r} -> Native.shutdown(r) end)

    Enum.each(state.waiters, fn w ->
      GenServer.reply(w.from, {:error, Error.new(:engine_dead, "the engine was shut down")})
    end)

    %{state | stopped: true, waiters: [], queue: []}
  end

  ## do_log_stats

  defp log_mark(cores) do
    totals = totals(cores)

    %{
      time: System.monotonic_time(:millisecond),
      prompt: totals.prompt,
      generation: totals.generation
    }
  end

  defp totals(cores) do
    zero = %{prompt: 0, generation: 0, queries: 0, hits: 0}

    Enum.reduce(cores, zero, fn {_, r}, acc ->
      case Native.counters(r) do
        {:ok, c} ->
          %{
            prompt: acc.prompt + c.prompt_tokens,
            generation: acc.generation + c.generation_tokens,
            queries: acc.queries + c.prefix_cache_queries,
            hits: acc.hits + c.prefix_cache_hits
          }

        _ ->
          acc
      end
    end)
  end

  defp stats_line(state) do
    totals = totals(state.cores)

    mark = %{
      time: System.monotonic_time(:millisecond),
      prompt: totals.prompt,
      generation: totals.generation
    }

    seconds = max(mark.time - state.log_mark.time, 1) / 1000
    prompt_rate = (mark.prompt - state.log_mark.prompt) / seconds
    generation_rate = (mark.generation - state.log_mark.generation) / seconds

    stats =
      Enum.reduce(state.cores, %{running: 0, waiting: 0, total: 0, free: 0}, fn {_, r}, acc ->
        case Native.stats(r) do
          {:ok, s} ->
            %{
              running: acc.running + s.num_running,
              waiting: acc.waiting + s.num_waiting,
              total: acc.total + s.total_blocks,
              free: acc.free + s.free_blocks
            }

          _ ->
            acc
        end
      end)

    kv_usage = if stats.total > 0, do: 100 * (stats.total - stats.free) / stats.total, else: 0.0
    hit_rate = if totals.queries > 0, do: 100 * totals.hits / totals.queries, else: 0.0

    line =
      "Engine #{map_size(state.cores)} core(s): " <>
        "Avg prompt throughput: #{fmt(prompt_rate)} tokens/s, " <>
        "Avg generation throughput: #{fmt(generation_rate)} tokens/s, " <>
        "Running: #{stats.running} reqs, Waiting: #{stats.waiting + length(state.queue)} reqs, " <>
        "KV cache usage: #{fmt(kv_usage)}%, Prefix cache hit rate: #{fmt(hit_rate)}%"

    {line, mark}
  end

  defp fmt(x), do: :erlang.float_to_binary(x / 1, decimals: 1)
end
