"""Plain Flower FedAvg on the HAR task: the reference that the scale benchmark times pocketfl against.

Flower's own `FedAvg` strategy sends and receives float32 ArrayRecords, and
the ClientApp trains the same HAR model on the same partitions as pocketfl,
through the same Task. Nothing of pocketfl's compression, downlink versions
or simulated clock runs here.
"""

import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from pocketfl.simulations.engine import backend_config
from pocketfl.tasks.base import TaskSettings, TrainSettings
from pocketfl.tasks.har.task import HarTask


def run_plain_fedavg(settings: TaskSettings, num_clients: int, fraction: float, rounds: int, epochs: int) -> dict:
    """Run Flower's FedAvg on HAR and return per-round wall seconds and accuracies."""
    round_ends: list[float] = []
    accuracies: list[float] = []

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        task = HarTask(settings)
        model = task.build_model(seed=settings.seed)
        x_central, y_central = task.central_data()

        def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, accuracy = task.evaluate(model, x_central, y_central)
            round_ends.append(time.perf_counter())
            accuracies.append(accuracy)
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        strategy = FedAvg(
            fraction_train=fraction,
            fraction_evaluate=fraction,
            min_available_nodes=num_clients,
        )
        config = ConfigRecord({"epochs": epochs, "seed": settings.seed})
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=rounds,
            train_config=config,
            evaluate_config=config,
            evaluate_fn=evaluate_global,
        )

    run_simulation(
        server_app=server_app,
        client_app=_client_app(settings),
        num_supernodes=num_clients,
        backend_config=backend_config(),
    )
    # round_ends[0] is the evaluation of the initial model, before round 1.
    return {
        "round_seconds": list(np.diff(round_ends)),
        "accuracy": accuracies[1:],
    }


def _client_app(settings: TaskSettings) -> ClientApp:
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        task = HarTask(settings)
        model = task.build_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        data = task.client_data(context.node_config)
        config = msg.content["config"]
        result = task.train(
            model,
            data,
            TrainSettings(epochs=int(config["epochs"]), learning_rate=0.05, batch_size=32, seed=0),
        )
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": result.num_examples}),
            }
        )
        return Message(content=content, reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        task = HarTask(settings)
        model = task.build_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        data = task.client_data(context.node_config)
        loss, accuracy = task.evaluate(model, data.x_eval, data.y_eval)
        metrics = MetricRecord({"num-examples": len(data.y_eval), "loss": loss, "accuracy": accuracy})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return client_app
