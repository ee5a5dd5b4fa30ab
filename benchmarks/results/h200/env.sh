export PYTHONPATH="$PYTHONPATH:/tmp/mmfast_gpu_site"
