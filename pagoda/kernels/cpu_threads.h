/* The thread count of every OpenMP region of pagoda's CPU kernels (included; hashed by
 * cpu_build.py). OpenMP's own count is per calling thread, and the engine's kernels run on a
 * thread that did not set it; cpu_build.py sets this in each library it loads (--threads). */
#ifndef PAGODA_CPU_THREADS_H
#define PAGODA_CPU_THREADS_H
#include <omp.h>

static int pagoda_nthreads = 0;  /* 0: OpenMP's default */

void pagoda_set_threads(int n) { pagoda_nthreads = n; }

#define NTHREADS (pagoda_nthreads > 0 ? pagoda_nthreads : omp_get_max_threads())

/* The team size a kernel's region gets when called from the current thread. */
int pagoda_threads_in_region(void) {
    int n = 0;
    #pragma omp parallel num_threads(NTHREADS)
    {
        #pragma omp single
        n = omp_get_num_threads();
    }
    return n;
}
#endif
