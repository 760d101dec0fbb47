"""The autoencoder: preprocessing, network, decoder, training steps, dataset, mesh, the trained
model restored. Imports io."""
