"""Local simulation: broker, aggregator and N agents as real processes over real MQTT."""
