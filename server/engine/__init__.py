"""The engine process: device, bank, batcher, preprocessing on the device, the channel's engine side."""
