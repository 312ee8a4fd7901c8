// Stand-in for the CUDA runtime header when a .cu file is compiled as C++ by the emulator.
#pragma once
#include "../cuda_emu.h"
