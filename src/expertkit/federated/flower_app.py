"""Flower as the transport: the server's rounds go out as Flower messages, each silo answers from its ClientApp.

Two ways to run the same apps:
- simulation (`simulate`, what `expertkit train --federated` runs): Flower's Simulation Runtime starts one
  virtual SuperNode per silo on Ray, on this machine;
- deployment: each silo runs a SuperNode with `--node-config "project='silo.yaml' silo='NAME'"` and the
  ClientApp `expertkit.federated.flower_app:client`; the ServerApp `expertkit.federated.flower_app:server`
  reads `project` and `domain` from the run config (README: Federated experts).

Messages: a "query" asks each node which silo it is and whether it can take part (base, data); a "train"
carries the global adapter (ArrayRecord) and the round's settings (ConfigRecord), and the reply carries the
client's update payload (plain or compressed) and its example count.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from expertkit.config import FederatedConfig, ProjectConfig, TrainConfig, load_config
from expertkit.errors import ExpertkitError
from expertkit.federated.client import ClientUpdate, RoundTask, SiloClient
from expertkit.federated.server import ClientRefused, FederatedTrainer

NODE_WAIT_S = 600  # how long the server waits for every silo's SuperNode to connect

# ---------------------------------------------------------------- messages


def _arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def encode_task(task: RoundTask, domain: str) -> RecordDict:
    settings = {"domain": domain, "round": task.round_index, "rounds": task.rounds, "factor": task.factor,
                "recipe": task.recipe.model_dump_json(), "federated": task.federated.model_dump_json(), "run": task.run}
    return RecordDict({"state": _arrays({k: v.numpy() for k, v in task.state.items()}),
                       "task": ConfigRecord(settings)})


def decode_task(content: RecordDict) -> tuple[str, RoundTask]:
    settings = content["task"]
    state = {k: torch.from_numpy(a.numpy().copy()) for k, a in content["state"].items()}
    return settings["domain"], RoundTask(int(settings["round"]), int(settings["rounds"]), str(settings["factor"]),
                                         state, TrainConfig.model_validate_json(settings["recipe"]),
                                         FederatedConfig.model_validate_json(settings["federated"]),
                                         str(settings["run"]))


def encode_update(update: ClientUpdate) -> RecordDict:
    return RecordDict({"update": _arrays(update.payload),
                       "result": ConfigRecord({"silo": update.silo, "examples": update.examples,
                                               "loss": update.loss})})


def decode_update(content: RecordDict) -> ClientUpdate:
    result = content["result"]
    payload = {k: a.numpy() for k, a in content["update"].items()}
    return ClientUpdate(str(result["silo"]), payload, int(result["examples"]), float(result["loss"]))


# ---------------------------------------------------------------- the client side

Resolver = Callable[[Context, str], SiloClient]  # (the node's context, domain) -> this node's silo client


def client_app(resolve: Resolver) -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        settings = message.content["query"]
        try:
            client = resolve(context, str(settings["domain"]))
            described = client.describe(json.loads(settings["identity"]),
                                        TrainConfig.model_validate_json(settings["recipe"]))
            answer = {"silo": client.silo, "refused": "", **described}
        except ExpertkitError as e:  # the user's to fix (another base, no text): the server stops the run with it
            answer = {"silo": str(context.node_config.get("silo", "")), "refused": str(e)}
        return Message(RecordDict({"answer": ConfigRecord(answer)}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        domain, task = decode_task(message.content)
        return Message(encode_update(resolve(context, domain).train(task)), reply_to=message)

    return app


_CLIENTS: dict[tuple, SiloClient] = {}  # per process (a Ray actor serves several virtual nodes in turn)


def simulation_resolver(config: ProjectConfig, state_root: Path, device: str | None = None) -> Resolver:
    """Virtual node i is silo i of the domain (Flower numbers the simulated nodes by `partition-id`)."""

    def resolve(context: Context, domain: str) -> SiloClient:
        silo = config.domain(domain).silos[int(context.node_config["partition-id"])].name
        key = (config.library, domain, silo)
        if key not in _CLIENTS:
            _CLIENTS[key] = SiloClient(config, domain, silo, Path(state_root) / silo, device)
        return _CLIENTS[key]

    return resolve


def deployment_resolver(context: Context, domain: str) -> SiloClient:
    """A real SuperNode: its own project YAML (its silo's data on its own disk) and silo name in node config."""
    node = context.node_config
    if "project" not in node or "silo" not in node:
        raise ExpertkitError("this SuperNode has no silo: start it with --node-config \"project='PATH.yaml' "
                             "silo='NAME'\"")
    key = (str(node["project"]), domain, str(node["silo"]))
    if key not in _CLIENTS:
        project = Path(str(node["project"]))
        state = Path(str(node.get("state-dir", project.parent / ".expertkit-federated" / str(node["silo"]))))
        _CLIENTS[key] = SiloClient(load_config(project), domain, str(node["silo"]), state)
    return _CLIENTS[key]


client = client_app(deployment_resolver)

# ---------------------------------------------------------------- the server side


class FlowerTransport:
    """The server's rounds over a Flower Grid: one message per silo's node, answers matched by node id."""

    def __init__(self, grid: Grid, domain: str, silos: list[str], timeout_s: float):
        self.grid, self.domain, self.silos, self.timeout_s = grid, domain, silos, timeout_s
        self.node_of: dict[str, int] = {}

    def _nodes(self) -> list[int]:
        deadline = time.time() + NODE_WAIT_S
        while len(nodes := list(self.grid.get_node_ids())) < len(self.silos):
            if time.time() > deadline:
                raise ExpertkitError(f"only {len(nodes)} of {len(self.silos)} silos' SuperNodes connected within "
                                     f"{NODE_WAIT_S} s; start one per silo")
            time.sleep(1)
        return nodes

    def describe(self, identity: dict, recipe: TrainConfig) -> dict[str, dict]:
        settings = ConfigRecord({"domain": self.domain, "identity": json.dumps(identity),
                                 "recipe": recipe.model_dump_json()})
        messages = [Message(RecordDict({"query": settings}), dst_node_id=node, message_type=MessageType.QUERY)
                    for node in self._nodes()]
        out = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout_s):
            if reply.has_error():
                raise ExpertkitError(f"a silo's client failed before training: {reply.error.reason}")
            answer = dict(reply.content["answer"])
            if answer["refused"]:
                raise ClientRefused(answer["refused"])
            self.node_of[answer["silo"]] = reply.metadata.src_node_id
            out[answer["silo"]] = {"examples": int(answer["examples"]), "fingerprint": str(answer["fingerprint"])}
        missing = sorted(set(self.silos) - set(out))
        if missing:
            raise ExpertkitError(f"no SuperNode answered for silo(s) {missing}; every silo must run one")
        return out

    def train(self, task: RoundTask) -> dict[str, ClientUpdate | str]:
        content = encode_task(task, self.domain)
        messages = [Message(content, dst_node_id=self.node_of[s], message_type=MessageType.TRAIN,
                            group_id=str(task.round_index)) for s in self.silos]
        silo_of = {node: silo for silo, node in self.node_of.items()}
        out: dict[str, ClientUpdate | str] = {s: f"no answer within {self.timeout_s:g} s" for s in self.silos}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout_s):
            silo = silo_of[reply.metadata.src_node_id]
            out[silo] = f"client error: {reply.error.reason}" if reply.has_error() else decode_update(reply.content)
        return out


def _run_server(grid: Grid, trainer: FederatedTrainer, overwrite: bool):
    transport = FlowerTransport(grid, trainer.domain.name, trainer.plan.silos, trainer.config.federated.round_timeout_s)
    return trainer.run(transport, overwrite=overwrite)


server = ServerApp()


@server.main()
def _deployed_server(grid: Grid, context: Context) -> None:
    """`flwr run` on a real federation: run config `project` (the server's YAML), `domain`, and `force`
    (train again an expert the library already has)."""
    from expertkit.base import load_base

    config = load_config(Path(str(context.run_config["project"])))
    base = load_base(config.base.path)
    force = bool(context.run_config.get("force", False))
    _run_server(grid, FederatedTrainer(config, base, str(context.run_config["domain"])), overwrite=force)


@contextmanager
def _environment(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _flower_warnings_only():
    """Our progress bar reports the rounds; Flower's own log keeps its warnings, less the note that its Python
    simulation API is deprecated in favour of `flwr run` (which is for Flower App projects, not this use)."""
    logger = logging.getLogger("flwr")
    level = logger.level

    def not_the_api_note(record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()

    logger.setLevel(logging.WARNING)
    logger.addFilter(not_the_api_note)
    try:
        with _environment(PYTHONWARNINGS="ignore::FutureWarning"):  # Ray's workers start with this environment
            yield
    finally:
        logger.setLevel(level)
        logger.removeFilter(not_the_api_note)


def simulate(trainer: FederatedTrainer, state_root: Path, overwrite: bool, cpus: int = 1, device: str | None = None):
    """Run the trainer's silos as virtual SuperNodes on Ray (Flower's Simulation Runtime) on this machine."""
    from flwr.simulation import run_simulation

    result = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result["entry"] = _run_server(grid, trainer, overwrite)

    resources = {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0}}
    # each virtual node's torch gets the cores Ray gives it (two nodes with all cores each slow down many times)
    with _flower_warnings_only(), _environment(OMP_NUM_THREADS=str(cpus)):
        run_simulation(app, client_app(simulation_resolver(trainer.config, state_root, device)),
                       num_supernodes=len(trainer.plan.silos), backend_config=resources)
    if "entry" not in result:
        raise ExpertkitError("the Flower simulation ended without an expert; its log above says why")
    return result["entry"]
