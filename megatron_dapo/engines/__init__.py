"""The rollout engines: clients, launchers, the engine set and the interfaces they implement.

* :mod:`~megatron_dapo.engines.protocols` - the ``typing.Protocol`` interfaces (actor, engine client, weight
  transport) and the ``Literal`` names of backends and transports.
* Clients: :mod:`~megatron_dapo.engines.client` (SGLang's native HTTP API: real SGLang and our CPU engine; built on
  :mod:`~megatron_dapo.engines.transport` and :mod:`~megatron_dapo.engines.payloads`),
  :mod:`~megatron_dapo.engines.vllm_client` (vLLM), :mod:`~megatron_dapo.engines.tensor_ipc` and
  :mod:`~megatron_dapo.engines.update_group` (the weight-update wire formats and process group).
* Launchers: :mod:`~megatron_dapo.engines.launch_common` (interpreter, ports, :class:`EngineProcesses`),
  :mod:`~megatron_dapo.engines.launch_cpu`, :mod:`~megatron_dapo.engines.launch_sglang`,
  :mod:`~megatron_dapo.engines.launch_vllm`, :mod:`~megatron_dapo.engines.launch_router`, and the command line
  the sbatch scripts run, :mod:`~megatron_dapo.engines.launch`.
* :mod:`~megatron_dapo.engines.engine_set` - :class:`EngineSet`, the engines' lifecycle owned in one place, and
  :data:`BACKENDS` (backend -> launcher, client, weight transports).
* :mod:`megatron_dapo.engines.cpu` - the project's CPU engine (SGLang's HTTP API over HF transformers).

This ``__init__`` imports nothing: the weight sync imports the clients and the engine set imports the weight sync,
so importing :class:`EngineSet` here would make every client import the weight sync (an import cycle). Import
from the submodules: ``from megatron_dapo.engines.engine_set import EngineSet``.
"""
