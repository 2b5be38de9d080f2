"""Broker configuration and launchers: mosquitto when installed, else the embedded amqtt."""

from broker.run import BrokerProcess, find_mosquitto, free_port, start_broker, wait_for_port

__all__ = ["BrokerProcess", "find_mosquitto", "free_port", "start_broker", "wait_for_port"]
