"""Federated training with Flower's deployment engine: real processes on loopback.

``deployment`` starts a SuperLink and one SuperNode per client, submits the
Flower app in ``flower_app/`` with ``flwr run`` and watches every process;
``apps`` holds that app's ServerApp (FedAvg) and ClientApp.
"""
