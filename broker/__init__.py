"""Broker configuration and launchers: mosquitto when installed, else the embedded amqtt."""

from broker.run import UPSTREAM_PREFIX, Bridge, BrokerProcess, find_mosquitto, free_port, start_broker, wait_for_port

__all__ = ["UPSTREAM_PREFIX", "Bridge", "BrokerProcess", "find_mosquitto", "free_port", "start_broker", "wait_for_port"]
