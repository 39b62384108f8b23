"""What runs on the phone: the Flower ClientApp, local training and the uplink encoder."""
