/* A floating-point kernel: renders the Mandelbrot set as a binary PGM image on stdout.
 * Usage: mandelbrot WIDTH HEIGHT MAX_ITER */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: mandelbrot WIDTH HEIGHT MAX_ITER\n");
        return 2;
    }
    int w = atoi(argv[1]), h = atoi(argv[2]), max_iter = atoi(argv[3]);
    if (w <= 0 || h <= 0 || w > 16384 || h > 16384 || max_iter <= 0 || max_iter > 1000000) {
        fprintf(stderr, "mandelbrot: WIDTH and HEIGHT in 1..16384, MAX_ITER in 1..1000000\n");
        return 2;
    }
    unsigned char *row = malloc((size_t)w);
    if (!row) {
        fprintf(stderr, "mandelbrot: out of memory\n");
        return 1;
    }
    printf("P5\n%d %d\n255\n", w, h);
    for (int y = 0; y < h; y++) {
        double ci = -1.25 + 2.5 * y / h;
        for (int x = 0; x < w; x++) {
            double cr = -2.0 + 3.0 * x / w;
            double zr = 0, zi = 0;
            int i = 0;
            while (i < max_iter && zr * zr + zi * zi <= 4.0) {
                double t = zr * zr - zi * zi + cr;
                zi = 2.0 * zr * zi + ci;
                zr = t;
                i++;
            }
            row[x] = (unsigned char)(i == max_iter ? 0 : 255 - (i * 255 / max_iter));
        }
        fwrite(row, 1, (size_t)w, stdout);
    }
    free(row);
    return 0;
}
