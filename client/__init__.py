"""Phone-side code: the Flower ClientApp, local training and the uplink encoder."""
