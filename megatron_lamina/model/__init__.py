"""Model-worker side: the split Megatron transformer layer, its spec, remote attention, the model."""
